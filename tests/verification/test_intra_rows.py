"""verification.studies.intra_rows: its page states the measured gap and each cut's counts (synthetic result)."""
from verification.studies import intra_rows as IR


def test_the_page_states_the_gap_and_every_cut():
    res = {"uses": 12, "rounding_max": 1.7, "real_min": 15.3,
           "candidates": {k: {"lost": 0, "kept_rounding": 0, "worst": 0.0} for k in [*IR.CANDIDATES, "ours"]}}
    res["candidates"]["o eps32 (2026-12-07, one sitting)"] = {"lost": 196, "kept_rounding": 0, "worst": 0.513}
    text = IR.markdown(res)
    assert "**1.7 eps32**" in text and "**15.3 eps32**" in text and "12 `nn.Linear`" in text
    assert "| o eps32 (2026-12-07, one sitting) | 196 | 0 | 0.513 |" in text
    assert "| proma (float32: 4 eps32) | 0 | 0 | 0 |" in text
    assert text.count("\n| ") == len(IR.CANDIDATES) + 2   # header + one row per cut + ours


def test_the_page_names_each_case_and_says_when_no_cut_separates_the_rows():
    res = {"uses": 2, "rounding_max": 3.61, "real_min": 0.0,
           "candidates": {k: {"lost": 0, "kept_rounding": 0, "worst": 0.0} for k in [*IR.CANDIDATES, "ours"]},
           "cases": [{"case": "learn-240 seed 5", "uses": 1, "real_min": 21.1, "lost": 0, "worst": 0.0,
                      "factors": 2e-6},
                     {"case": f"{IR.REPORT_CASE} seed 0", "uses": 1, "real_min": 0.0, "lost": 11, "worst": 0.092,
                      "factors": 1.4e-5}]}
    text = IR.markdown(res)
    assert "| learn-240 seed 5 | 1 | 21.1 | 0 | 0 | 2e-06 |" in text
    assert f"| {IR.REPORT_CASE} seed 0 | 1 | 0 | 11 | 0.092 | 1.4e-05 |" in text
    assert "No cut separates the two kinds of rows" in text
    # with a gap, the page states its factor instead
    gap = IR.markdown({**res, "real_min": 15.3, "rounding_max": 1.7})
    assert "a factor of 9 here" in gap and "No cut separates" not in gap
