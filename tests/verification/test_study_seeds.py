"""verification.studies.seeds: the resumable grid (smoke policy) and its aggregation."""
import hashlib
import json

import numpy as np

import pytest
import torch

from verification.studies import tables as T
from verification.studies import seeds as S


def _result(method, seed, kl, rewards, val):
    recs = [{"step": k // 2, "reward": rewards[k // 2], "entropy": 1.0 - 0.1 * (k // 2), "local_kl": kl}
            for k in range(2 * len(rewards))]
    return {"config": {"method": method, "lr": 1e-3, "seed": seed}, "metrics": recs,
            "final_eval": {"accuracy": val, "se": 0.01, "n": 100}}


def test_run_numbers_definitions():
    out = T.run_numbers(_result("grpo", 0, 0.02, [0.1, 0.2, 0.3, 0.5], 0.6), {"accuracy": 0.55})
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
    table = T.aggregate(T.load_results(tmp_path, "learn"))
    ratio = table[("proma", 1e-3)]["ratio_local_kl"]
    assert ratio["mean"] == pytest.approx(0.5) and ratio["hi"] == pytest.approx(0.5)  # every seed's ratio is 0.5
    text = T.markdown_tables(table)
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
    assert set(res["code"]) == {"commit", "dirty", "root"} and len(res["code"]["commit"]) == 40
    env = res["environment"]
    assert env["torch"] == torch.__version__ and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(env) == {"python", "torch", "transformers", "numpy", "cpu_capability", "cpu"} and env["cpu"]
    warm = res["warmstart"]["id"]
    assert len(warm) == S.WARMSTART_ID_CHARS and (tmp_path / "data" / "t" / f"start_eval-{warm}.json").is_file()
    assert T.load_results(tmp_path / "data", "t")[("proma", 1e-3, 1)]["val_change"] == pytest.approx(
        res["final_eval"]["accuracy"] - json.loads((tmp_path / "data" / "t" / f"start_eval-{warm}.json").read_text())["accuracy"])
    assert S.run_study(grid, tmp_path / "data", tmp_path / "runs", jobs=1, log=lambda *a: None) == []
    table = T.aggregate(T.load_results(tmp_path / "data", "t"))
    assert table[("proma", 1e-3)]["n_seeds"] == 2
    assert table[("proma", 1e-3)]["ratio_local_kl"] is None  # the smoke policy earns no reward: zero local KL
    assert "n/a (a run has zero local KL)" in T.markdown_tables(table)


def test_restrict_keeps_only_the_named_parts_of_a_grid():
    small = S.restrict(S.StudyGrid(), methods=["grpo", "reinforce"], seeds=[5, 6], regimes=["collapse"])
    assert small.runs() == [("collapse", m, 3e-4, s) for s in (5, 6) for m in ("reinforce", "grpo")]
    assert S.restrict(S.StudyGrid()) == S.StudyGrid()
    with pytest.raises(ValueError, match="--seeds: \\[15\\]"):
        S.restrict(S.StudyGrid(), seeds=[15])
    with pytest.raises(ValueError, match="--methods"):
        S.restrict(S.StudyGrid(), methods=["ppo"])


def test_reward_kl_curve_and_gain_within_kl():
    res = _result("grpo", 0, 0.5, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], 0.6)  # 2 optimizer steps per rollout step
    reward, cum = T.reward_kl_curve(res)
    assert reward.tolist() == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert cum.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    # budget 4 is reached at the 4th rollout step: gain over steps 1..4 = 0.3 - 0.0 (quarters of one step)
    assert T.gain_within_kl(reward, cum, 4.0) == (pytest.approx(0.3), 4)
    # budget 6 -> 6 steps, quarter = round(1.5) = 2 steps: mean(0.4, 0.5) - mean(0.0, 0.1)
    assert T.gain_within_kl(reward, cum, 6.0) == (pytest.approx(0.4), 6)
    # never fewer than MIN_EQUAL_KL_STEPS steps; the whole run when the budget is never reached
    assert T.gain_within_kl(reward, cum, 0.5)[1] == T.MIN_EQUAL_KL_STEPS
    assert T.gain_within_kl(reward, cum, 100.0) == (pytest.approx(0.65 - 0.05), 8)


def test_equal_kl_cuts_the_faster_run_at_the_slower_ones_budget():
    rewards = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    curves = {}
    for s in range(3):
        curves[("grpo", 1e-3, s)] = T.reward_kl_curve(_result("grpo", s, 0.5, rewards, 0.6))    # 1 KL per step
        curves[("proma", 1e-3, s)] = T.reward_kl_curve(_result("proma", s, 0.25, rewards, 0.6))  # 0.5 per step
    row = T.equal_kl(curves)[("proma", 1e-3)]
    assert row["budget"]["mean"] == pytest.approx(4.0)        # proma's final cumulative KL
    assert (row["steps"], row["steps_base"]) == (8, 4)       # grpo reaches 4.0 at its 4th step
    assert row["gain"]["mean"] == pytest.approx(0.6)         # proma: whole run, quarters of 2 steps
    assert row["gain_base"]["mean"] == pytest.approx(0.3)    # grpo: first 4 steps
    assert row["diff"]["mean"] == pytest.approx(0.3) and row["diff"]["lo"] == pytest.approx(0.3)
    assert "| proma | 0.001 | 4 [4, 4] | 8 / 4 | 0.600 [0.600, 0.600] | 0.300" in T.markdown_equal_kl(
        T.equal_kl(curves))


def test_aggregate_of_a_study_in_progress(tmp_path):
    """A method with one finished seed is tabulated without an interval (a resumed report must not fail)."""
    folder = tmp_path / "learn"
    folder.mkdir()
    for m, seeds in (("grpo", (0, 1)), ("proma", (0,))):
        for s in seeds:
            (folder / f"{S.run_name(m, 1e-3, s)}.json").write_text(json.dumps(_result(m, s, 0.02, [0.1, 0.3], 0.6)))
    table = T.aggregate(T.load_results(tmp_path, "learn"))
    assert table[("proma", 1e-3)]["n_seeds"] == 1 and "ratio_local_kl" not in table[("proma", 1e-3)]
    assert "| proma | 0.001 | 1 | 0.200 (1 seed, no interval) |" in T.markdown_tables(table)
    assert table[("grpo", 1e-3)]["columns"]["reward_gain"]["lo"] == pytest.approx(0.2)


def test_record_warmstart_copies_once_and_skips_a_missing_record(tmp_path):
    """The warm-start record lands in the regime's data folder once; a warm-start without one is skipped."""
    warm, folder = tmp_path / "warm", tmp_path / "data" / "learn"
    warm.mkdir()
    S.record_warmstart(warm, folder)
    assert not (folder / "warmstart.json").exists()
    (warm / "warmstart.json").write_text('{"steps": 1000, "seconds": 699.0}')
    S.record_warmstart(warm, folder)
    assert json.loads((folder / "warmstart.json").read_text()) == {"steps": 1000, "seconds": 699.0}
    (warm / "warmstart.json").write_text('{"steps": 1000, "seconds": 1.0}')
    S.record_warmstart(warm, folder)  # an existing copy is kept
    assert json.loads((folder / "warmstart.json").read_text())["seconds"] == 699.0


def test_validation_per_seed_table_marks_missing_seeds():
    """One column per seed, accuracy ± SE per run, '-' where a method's seed has not run."""
    runs = {("grpo", 1e-4, 0): {"val_final": 0.3125, "val_final_se": 0.0071},
            ("grpo", 1e-4, 1): {"val_final": 0.25, "val_final_se": 0.0066},
            ("proma", 1e-4, 1): {"val_final": 0.5, "val_final_se": 0.0077}}
    lines = T.markdown_validation_per_seed(runs).splitlines()
    assert lines[0] == "| method | lr | seed 0 | seed 1 |"
    assert lines[2:] == ["| grpo | 0.0001 | 0.312 ± 0.007 | 0.250 ± 0.007 |",
                         "| proma | 0.0001 | - | 0.500 ± 0.008 |"]


def test_warmstart_archive_round_trip(tmp_path):
    cache, archive = tmp_path / "cache", tmp_path / "archive"
    (cache / "warmstart-abc").mkdir(parents=True)
    (cache / "warmstart-abc" / "warmstart.json").write_text('{"key": "abc"}')
    (cache / "warmstart-abc" / "model.safetensors").write_bytes(b"weights")
    (cache / "warmstart-unfinished").mkdir()            # no record: a warm-start still training is not archived
    S.sync_warmstart_archive(cache, archive)
    assert sorted(p.name for p in archive.iterdir()) == ["warmstart-abc"]
    (archive / "warmstart-def").mkdir()
    (archive / "warmstart-def" / "warmstart.json").write_text('{"key": "def"}')
    S.sync_warmstart_archive(cache, archive)
    assert (cache / "warmstart-def" / "warmstart.json").is_file()
    assert S.warmstart_id(cache / "warmstart-abc") == hashlib.sha256(b"weights").hexdigest()[:S.WARMSTART_ID_CHARS]


def test_thirds_cover_the_run_in_order_and_are_never_empty():
    assert [t.tolist() for t in T.thirds(np.arange(7))] == [[0, 1], [2, 3], [4, 5, 6]]
    assert [t.tolist() for t in T.thirds(np.arange(2))] == [[0], [0], [1]]
    assert [len(t) for t in T.thirds(np.arange(480))] == [160, 160, 160]
    with pytest.raises(ValueError, match="empty"):
        T.thirds(np.arange(0))


def test_warmstart_evals_group_the_seeds_by_the_warmstart_they_started_from(tmp_path):
    """Seeds 0-1 predate warm-start ids (the first study's ``start_eval.json``), seeds 2-3 record theirs; each
    warm-start is listed with its own evaluation and seeds, the first study's first."""
    folder = tmp_path / "learn"
    folder.mkdir()
    (folder / "start_eval.json").write_text(json.dumps({"n": 100, "accuracy": 0.30, "se": 0.046}))
    (folder / "start_eval-abc.json").write_text(json.dumps({"n": 100, "accuracy": 0.35, "se": 0.048}))
    for seed in range(4):
        res = _result("grpo", seed, 0.02, [0.1, 0.2, 0.3, 0.5], 0.4)
        if seed >= 2:
            res["warmstart"] = {"id": "abc"}
        (folder / f"grpo-lr0.001-s{seed}.json").write_text(json.dumps(res))
    evals = T.warmstart_evals(folder)
    assert [(e["file"], e["accuracy"], e["seeds"]) for e in evals] == [("start_eval.json", 0.30, [0, 1]),
                                                                       ("start_eval-abc.json", 0.35, [2, 3])]
    runs = T.load_results(tmp_path, "learn")     # and each run's validation change is against its own warm-start
    assert runs[("grpo", 1e-3, 1)]["val_change"] == pytest.approx(0.10)
    assert runs[("grpo", 1e-3, 3)]["val_change"] == pytest.approx(0.05)
    with pytest.raises(ValueError, match=r"empty.start_eval\.json: missing"):
        (tmp_path / "empty").mkdir()
        T.warmstart_evals(tmp_path / "empty")


def test_warmstart_trains_single_threaded_like_every_run(tmp_path):
    """Study processes run one per core; a warm-start on torch's default thread count beside another one
    oversubscribes the cores."""
    for regime in S.GRIDS["full"].regimes:
        cfg = S.warmstart_config(S.GRIDS["full"], regime, tmp_path)
        assert cfg.num_threads == 1 and cfg.seed == 0
        run = S.run_config(S.GRIDS["full"], regime, "grpo", S.GRIDS["full"].lrs[regime][0], 3, warm_dir=tmp_path,
                           runs_dir=tmp_path)
        assert run["num_threads"] == cfg.num_threads
