"""verification.studies.study2: the pilot's stopping rule (PREREGISTRATION-2.md section 4), the cells it opens and
the run order, on synthetic result files whose entropy end/start is known."""
import json

import numpy as np
import pytest
import scipy.stats as sps

from verification.studies import study2, tables

STEPS = 8   # rollout steps of a synthetic run: its last quarter is the last two


def _write(data_dir, name, seed, end_ratio):
    """A GRPO pilot result of candidate ``name`` whose entropy end/start is ``end_ratio`` exactly."""
    lr = dict((n, lr) for n, _, lr in study2.CANDIDATES)[name]
    entropy = [1.0, *np.linspace(0.9, end_ratio, STEPS - 3), end_ratio, end_ratio]
    recs = [{"step": k, "minibatch": 0, "reward": 0.5, "entropy": e, "local_kl": 1e-3} for k, e in enumerate(entropy)]
    path = tables.result_path(data_dir, name, "grpo", lr, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metrics": recs, "final_eval": {"accuracy": 0.5, "se": 0.01}}))


def _pilot(data_dir, name, ratios):
    for seed, r in zip(study2.PILOT_SEEDS, ratios):
        _write(data_dir, name, seed, r)


def test_a_candidate_is_judged_by_scipys_t_interval_of_its_five_seeds(tmp_path):
    ratios = [0.42, 0.47, 0.39, 0.44, 0.50]
    _pilot(tmp_path, "collapse-120", ratios)
    iv = study2.candidate_interval(tmp_path, "collapse-120")
    lo, hi = sps.t.interval(0.95, 4, loc=np.mean(ratios), scale=sps.sem(ratios))
    np.testing.assert_allclose([iv["mean"], iv["lo"], iv["hi"]], [np.mean(ratios), lo, hi], rtol=1e-12)
    # four of five seeds: no interval yet, so the candidate is undecided
    (tmp_path / "other").mkdir()
    _pilot(tmp_path / "other", "collapse-120", ratios[:4])
    assert study2.candidate_interval(tmp_path / "other", "collapse-120") is None


def test_the_pilot_goes_on_past_a_candidate_whose_interval_reaches_one_half(tmp_path):
    _pilot(tmp_path, "collapse-120", [0.30, 0.45, 0.40, 0.60, 0.35])   # upper end above 1/2
    accepted, nxt, seen = study2.pilot_state(tmp_path)
    assert (accepted, nxt) == (None, "collapse-lr6e-4")
    assert [n for n, _ in seen] == ["collapse-120", "collapse-lr6e-4"] and seen[1][1] is None
    assert "x" not in study2.cells(tmp_path)


def test_the_first_candidate_below_one_half_is_accepted_and_opens_x(tmp_path):
    _pilot(tmp_path, "collapse-120", [0.30, 0.45, 0.40, 0.60, 0.35])
    _pilot(tmp_path, "collapse-lr6e-4", [0.20, 0.25, 0.22, 0.30, 0.24])
    _pilot(tmp_path, "pool16-120", [0.10, 0.12, 0.11, 0.13, 0.12])    # after an accepted one: never considered
    accepted, nxt, seen = study2.pilot_state(tmp_path)
    assert (accepted, nxt) == ("collapse-lr6e-4", None) and len(seen) == 2
    x = study2.cells(tmp_path)["x"]
    assert x.methods == study2.X_METHODS and tuple(x.seeds) == study2.X_SEEDS
    assert x.lrs == {"collapse-lr6e-4": (6e-4,)}


def test_without_an_accepted_candidate_the_pilot_ends_and_x_is_not_run(tmp_path):
    for name, _, _ in study2.CANDIDATES:
        _pilot(tmp_path, name, [0.45, 0.55, 0.50, 0.60, 0.52])
    accepted, nxt, seen = study2.pilot_state(tmp_path)
    assert (accepted, nxt) == (None, None) and len(seen) == len(study2.CANDIDATES)
    assert sorted(study2.cells(tmp_path)) == sorted(study2.CELLS)


def test_runs_are_ordered_seed_by_seed_across_the_cells():
    order = study2.ordered_runs(study2.CELLS)
    seeds = [key[3] for _, key in order]
    assert seeds == sorted(seeds)
    assert len(order) == sum(len(g.runs()) for g in study2.CELLS.values()) == 260
    first_seed = {cell for cell, key in order if key[3] == 0}
    assert first_seed == set(study2.CELLS)


def test_an_unknown_cell_is_refused_by_name(tmp_path):
    with pytest.raises(SystemExit, match=r"--cells: \['x'\] not in the study \(the pilot has not accepted"):
        study2.main(["--data-dir", str(tmp_path), "--cells", "x", "--plan"])
