"""verification.study_seeds: the resumable grid (smoke policy) and its aggregation."""
import json

import pytest

from verification import study_seeds as S


def _result(method, seed, kl, rewards, val):
    recs = [{"step": k // 2, "reward": rewards[k // 2], "entropy": 1.0 - 0.1 * (k // 2), "local_kl": kl}
            for k in range(2 * len(rewards))]
    return {"config": {"method": method, "lr": 1e-3, "seed": seed}, "metrics": recs,
            "final_eval": {"accuracy": val, "se": 0.01, "n": 100}}


def test_run_numbers_definitions():
    out = S.run_numbers(_result("grpo", 0, 0.02, [0.1, 0.2, 0.3, 0.5], 0.6), {"accuracy": 0.55})
    assert out["reward_gain"] == pytest.approx(0.4)          # last quarter (1 step) minus first
    assert out["local_kl_cum"] == pytest.approx(8 * 0.02)    # 8 optimizer steps
    assert out["entropy_min_ratio"] == pytest.approx(0.7)
    assert out["val_change"] == pytest.approx(0.05)


def test_aggregate_pairs_by_seed(tmp_path):
    folder = tmp_path / "learn"
    folder.mkdir()
    for s in range(5):
        for m, kl in (("grpo", 0.02 + 0.001 * s), ("proma", 0.01 + 0.0005 * s)):
            (folder / f"{S.run_name(m, 1e-3, s)}.json").write_text(json.dumps(_result(m, s, kl, [0.1, 0.3], 0.6)))
    table = S.aggregate(S.load_results(tmp_path, "learn"))
    ratio = table[("proma", 1e-3)]["ratio_local_kl"]
    assert ratio["mean"] == pytest.approx(0.5) and ratio["hi"] == pytest.approx(0.5)  # every seed's ratio is 0.5
    text = S.markdown_tables(table)
    assert "| proma | 0.001 | 0.500 [0.500, 0.500]" in text and "reward_gain:" in text


def test_grid_lists_whole_seeds_first():
    grid = S.StudyGrid(regimes={"a": {"steps": 2}}, lrs={"a": (1e-3,)}, methods=("grpo", "proma"), seeds=(0, 1))
    assert grid.runs() == [("a", "grpo", 1e-3, 0), ("a", "proma", 1e-3, 0), ("a", "grpo", 1e-3, 1),
                           ("a", "proma", 1e-3, 1)]
    with pytest.raises(ValueError, match="lrs"):
        S.StudyGrid(regimes={"a": {}}, lrs={})


@pytest.mark.slow
def test_smoke_study_runs_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "WHOLE_SPLIT", 16)
    grid = S.StudyGrid(regimes={"t": dict(steps=2)}, lrs={"t": (1e-3,)}, methods=("grpo", "proma"), seeds=(0, 1),
                       preset="smoke")
    done = S.run_study(grid, tmp_path / "data", tmp_path / "runs", jobs=1, log=lambda *a: None)
    assert len(done) == 4
    res = json.loads(S.result_path(tmp_path / "data", "t", "proma", 1e-3, 1).read_text())
    assert res["final_eval"]["n"] == 16 and len(res["final_eval"]["hits"]) == 16
    assert len(res["metrics"]) == 2 * 2  # 2 rollout steps x 2 minibatches
    assert S.run_study(grid, tmp_path / "data", tmp_path / "runs", jobs=1, log=lambda *a: None) == []
    table = S.aggregate(S.load_results(tmp_path / "data", "t"))
    assert table[("proma", 1e-3)]["n_seeds"] == 2
    assert table[("proma", 1e-3)]["ratio_local_kl"] is None  # the smoke policy earns no reward: zero local KL
    assert "n/a (a run has zero local KL)" in S.markdown_tables(table)
