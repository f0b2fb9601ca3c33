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
