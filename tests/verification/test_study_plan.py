"""verification.studies.plan: runs left and their estimated cost, from the runs' own recorded wall times."""
import json

import pytest

from verification.studies import plan as SP
from verification.studies.tables import result_path, run_wall_seconds
from verification.studies.seeds import StudyGrid


def _write(data_dir, regime, method, seed, seconds, lr=1e-3, step_times=(1.0,)):
    path = result_path(data_dir, regime, method, lr, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = [{"step": s, "time/rollout": t, "time/train": 0.0, "time/metrics": 0.0} for s, t in enumerate(step_times)]
    path.write_text(json.dumps({"seconds": {"total": seconds, "train": seconds - 5}, "metrics": metrics}))


def test_plan_counts_done_runs_and_estimates_the_rest(tmp_path):
    grid = StudyGrid(regimes={"a": {}, "b": {}}, lrs={"a": (1e-3,), "b": (1e-3,)}, methods=("grpo", "proma"),
                     seeds=(0, 1, 2))
    for seed in (0, 1):
        _write(tmp_path, "a", "grpo", seed, 60.0)       # 1 min
        _write(tmp_path, "a", "proma", seed, 180.0)     # 3 min: 3x GRPO in regime a
    _write(tmp_path, "b", "grpo", 0, 120.0)             # 2 min; proma has no run in b
    _write(tmp_path, "b", "grpo", 9, 999.0)             # a seed outside the grid does not count
    rows = {(r.regime, r.method): r for r in SP.plan(grid, tmp_path)}
    assert (rows[("a", "grpo")].done, rows[("a", "grpo")].planned) == (2, 3)
    assert rows[("a", "proma")].minutes_per_run == pytest.approx(3.0) and rows[("a", "proma")].measured
    est = rows[("b", "proma")]     # GRPO's 2 min in b x proma's 3x relative cost in a
    assert est.done == 0 and not est.measured and est.minutes_per_run == pytest.approx(6.0)
    assert est.minutes_left == pytest.approx(18.0)
    text = SP.markdown(list(rows.values()), workers=2)
    # left: a 1 + 1 runs (1 + 3 min), b 2 grpo (4 min) + 3 proma (18 min) = 26 worker-minutes
    assert "| b | proma | 0 / 3 | 6.0 (est.) | 18 |" in text
    assert "Left: 7 runs, about 0.4 worker-hours (0.2 h on 2 workers)." in text
    # b's proma has no run, so no fastest pace exists for every row: no such total
    assert "fastest" not in text
    _write(tmp_path, "a", "grpo", 2, 30.0)              # a's third grpo run, the fastest: 0.5 min
    _write(tmp_path, "b", "proma", 0, 240.0)            # b's proma: 4 min
    rows = SP.plan(grid, tmp_path)
    assert {(r.regime, r.method): r.fastest_minutes for r in rows}[("a", "grpo")] == pytest.approx(0.5)
    # left at the fastest pace: a proma 1 x 3 min, b grpo 2 x 2 min, b proma 2 x 4 min = 15 worker-minutes
    assert "about 0.2 worker-hours (0.1 h on 2 workers)." in SP.markdown(rows, workers=2).splitlines()[-1]


def test_plan_without_any_run_has_no_estimate(tmp_path):
    grid = StudyGrid(regimes={"a": {}}, lrs={"a": (1e-3,)}, methods=("grpo",), seeds=(0, 1))
    rows = SP.plan(grid, tmp_path / "nothing-yet")
    assert [(r.done, r.planned, r.minutes_left) for r in rows] == [(0, 2, None)]
    assert "2 runs without an estimate" in SP.markdown(rows)


def test_a_resumed_run_costs_its_step_times_not_its_last_sittings_seconds(tmp_path):
    def rec(step, rollout, train):
        return {"step": step, "time/rollout": rollout, "time/train": train, "time/metrics": 1.0}

    # uninterrupted: step times (90 s) sum below the training time (95 s), so the recorded total (100 s) stands
    whole = {"seconds": {"total": 100.0, "train": 95.0}, "metrics": [rec(0, 20.0, 24.0), rec(1, 20.0, 24.0), {}]}
    assert run_wall_seconds(whole) == 100.0
    # resumed: the last sitting trained 30 s, its steps took 400 s in all (step 0's rollout, 100 s, is repeated in
    # both of its minibatch records and counts once), the final evaluation 10 s
    resumed = {"seconds": {"total": 40.0, "train": 30.0},
               "metrics": [rec(0, 100.0, 49.0), rec(0, 100.0, 49.0), rec(1, 100.0, 99.0)]}
    assert run_wall_seconds(resumed) == 410.0
    grid = StudyGrid(regimes={"a": {}}, lrs={"a": (1e-3,)}, methods=("grpo",), seeds=(0, 1))
    _write(tmp_path, "a", "grpo", 0, 60.0, step_times=(50.0,))          # 1 min
    _write(tmp_path, "a", "grpo", 1, 60.0, step_times=(100.0, 75.0))    # resumed: 180 s = 3 min
    assert SP.plan(grid, tmp_path)[0].minutes_per_run == pytest.approx(2.0)


def test_seed_minutes_cost_each_missing_run_at_its_rows_pace(tmp_path):
    grid = StudyGrid(regimes={"a": {}}, lrs={"a": (1e-3, 2e-3)}, methods=("grpo", "proma"), seeds=(0, 1))
    _write(tmp_path, "a", "grpo", 0, 60.0)                   # 1 min a grpo run
    _write(tmp_path, "a", "proma", 0, 180.0, lr=2e-3)        # 3 min a proma run
    rows = SP.plan(grid, tmp_path)
    # seed 0 misses grpo at 2e-3 (1) and proma at 1e-3 (3); seed 1 misses all four (1 + 1 + 3 + 3)
    assert SP.seed_minutes(grid, tmp_path, rows) == pytest.approx({0: 4.0, 1: 8.0})


def test_balanced_seeds_give_the_longest_seed_to_the_least_loaded_worker():
    minutes = {0: 5.0, 1: 4.0, 2: 3.0, 3: 3.0, 4: 3.0}
    # seed 0 (5) -> w0, 1 (4) -> w1, 2 (3) -> w1 (7), 3 (3) -> w0 (8), 4 (3) -> w1 (10)
    assert SP.balanced_seeds(minutes, 2) == [([0, 3], 8.0), ([1, 2, 4], 10.0)]
    assert SP.balanced_seeds(minutes, 1) == [([0, 1, 2, 3, 4], 18.0)]
    with pytest.raises(ValueError, match="workers must be >= 1; got 0"):
        SP.balanced_seeds(minutes, 0)
    line = SP.split_line({0: 120.0, 1: 60.0}, 3)
    assert line == ("Seeds left, balanced over 3 workers by the estimate: `--seeds 0` (2.0 worker-hours); "
                    "`--seeds 1` (1.0 worker-hours).")
