"""The report generator: end to end on the smoke configuration, and text that follows the numbers."""
import json
import re

import pytest

from verification import reading
from verification.reading import SECTION_HEADINGS
from verification.report import generate_report


@pytest.mark.slow
def test_smoke_report_end_to_end(tmp_path, realcase_cache):
    out = tmp_path / "report"
    path = generate_report(out, mode="smoke", realcase_cache=realcase_cache, log=lambda *a, **k: None)
    text = path.read_text()
    positions = [text.find(h + "\n") for h in SECTION_HEADINGS]
    assert all(p >= 0 for p in positions), [h for h, p in zip(SECTION_HEADINGS, positions) if p < 0]
    assert positions == sorted(positions)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert len(images) >= 9
    for name in images:
        png = out / name
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in ("oracle.json", "summaries.json", "meta.json", "projection_end.json"):
        json.loads((out / "data" / name).read_text())
    runs = sorted(p.name for p in (out / "data" / "runs").glob("*.json"))
    assert len(runs) == 10  # 5 methods x 2 learning rates
    oracle = json.loads((out / "data" / "oracle.json").read_text())
    assert all(r["status"] == "PASS" for rows in oracle["results"].values() for r in rows)
    assert "nan" not in text.lower().replace("nans", "")
    assert (out / "runs" / ".gitignore").read_text().strip().endswith("*")


def _summary(method, lr, kl, gain=0.1, val=0.5, entropy=(1.0, 0.9)):
    stats = {"mean": kl, "p95": 2 * kl, "max": 3 * kl, "n": 4}
    nan = float("nan")
    return {"method": method, "lr": lr, "local_kl": stats, "local_kl_seq": stats, "local_kl_2nd_order": stats,
            "kl_rollout": stats, "removed_ratio": stats, "grad_norm": stats, "clip_ratio": stats,
            "second_order": {"median_ratio": 1.0, "ratio_p5": 0.5, "ratio_p95": 2.0, "log_corr": 0.9, "n": 4},
            "reward_start": 0.1, "reward_end": 0.1 + gain, "reward_gain": gain, "entropy_start": entropy[0],
            "entropy_end": entropy[1], "entropy_ratio": entropy[1] / entropy[0], "entropy_min": entropy[1],
            "val_start": 0.1, "val_end": val, "val_max": val, "val_gain": val - 0.1, "step_time": nan,
            "wall_time": nan, "steps": 4, "opt_steps": 8}


META = {"grid": {"steps": 4, "methods": [], "lrs": []}, "timings_s": {},
        "harness_config": {"eval_size": 256, "microbatch_size": 16, "minibatches": 2, "prompts_per_step": 16,
                           "group_size": 8, "max_new_tokens": 10}}


@pytest.mark.parametrize("proma_kl, verdict", [(0.5, "agree with the claim at every learning rate"),
                                               (2.0, "do not reproduce the claim")])
def test_reading_follows_the_kl_numbers(proma_kl, verdict):
    summaries = [_summary("grpo", 1e-4, 1.0), _summary("proma", 1e-4, proma_kl)]
    text = "\n".join(reading._claims(META, {}, summaries))
    assert verdict in text
    assert f"{proma_kl:g}x at lr 0.0001" in text


def test_reading_entropy_and_validation_verdicts():
    summaries = [_summary("grpo", 1e-4, 1.0, entropy=(1.0, 0.2), val=0.3),
                 _summary("proma", 1e-4, 1.0, entropy=(1.0, 0.9), val=0.4),
                 _summary("intra", 1e-4, 1.0, entropy=(1.0, 0.8), val=0.6)]
    text = "\n".join(reading._claims(META, {}, summaries))
    assert "grpo collapsed while PROMA did not" in text
    assert "the best is intra (0.6)" in text and "intra is best (or tied for best) at every learning rate" in text


def test_equal_gain_interpolation():
    from verification.study_metrics import kl_at_equal_gain

    eq = kl_at_equal_gain([(0.1, 1e-3), (0.3, 4e-3)], [(0.2, 1e-2), (0.4, 2e-2)])
    assert eq["gain"] == pytest.approx(0.25)
    assert eq["kl_a"] == pytest.approx(1e-3 * 4 ** 0.75)
    assert eq["kl_b"] == pytest.approx(1e-2 * 2 ** 0.25)
    assert kl_at_equal_gain([(0.1, 1e-3)], [(0.5, 1e-3), (0.6, 1e-3)]) is None
