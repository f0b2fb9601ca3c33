"""The second pre-registered study (reports/PREREGISTRATION-2.md): its cells, its pilot, and the order of its runs.

A *cell* is a :class:`verification.studies.seeds.StudyGrid` whose runs share methods, learning rates and seeds:

- ``frontier``: grpo, exact PROMA and the published settings at 0.5x, 1x, 2x the regime's learning rate in
  *learn-240* and *collapse* (the matched-step endpoint);
- ``mb1``: the same three methods at 1x with one minibatch per rollout (no clipping);
- ``code``: ``proma-code`` (the published code as a method) at 1x in *learn-240* and *collapse*;
- ``x``: grpo, reinforce, exact PROMA and the published settings in the regime *X* where GRPO's entropy
  collapses, chosen by the pilot (:func:`accepted_candidate`; the cell exists once the pilot has decided).

Every run logs the out-of-sample local KL (``oos_kl_prompts``). Runs use the first study's committed
warm-starts (``data/warmstarts``) and write ``reports/data/study2/<regime>/<method>-lr<lr>-s<seed>.json``
(:func:`verification.studies.seeds.run_one`: config, records, final whole-split accuracy, code commit, warm-start).
The order interleaves the cells seed by seed, so a partial study has whole seeds of every cell.

Command line: ``python -m verification.studies.study2 --pilot`` runs the pilot by its stopping rule;
``python -m verification.studies.study2 [--cells ...] [--seeds ...]`` runs what is missing; ``--plan`` prints the cost
left. Both refuse to run cells of *X* before the pilot has accepted a candidate.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import plan, stats, tables
from .seeds import REGIMES, StudyGrid, prepare_regime, restrict, run_all, run_config

DATA_DIR = "reports/data/study2"
FIRST_STUDY_DIR = "reports/data/seeds"
# Held-out prompts per optimizer step of the out-of-sample local KL (PREREGISTRATION-2.md section 2).
OOS_PROMPTS = 32
OOS = dict(oos_kl_prompts=OOS_PROMPTS)
FRONTIER_METHODS = ("grpo", "proma", "proma-paper")
X_METHODS = ("grpo", "reinforce", "proma", "proma-paper")
SEEDS = tuple(range(10))
X_SEEDS = tuple(range(15))
PILOT_SEEDS = (100, 101, 102, 103, 104)

# The first study's regimes, unchanged but for the out-of-sample measurement; and their one-minibatch variants.
REGIMES2 = {
    "learn-240": dict(REGIMES["learn-240"], **OOS),
    "collapse": dict(REGIMES["collapse"], **OOS),
}
REGIMES2_MB1 = {f"{name}-mb1": dict(over, minibatches=1) for name, over in REGIMES2.items()}
ONE_X = {"learn-240": 1e-4, "collapse": 3e-4}
RATES = {name: (lr / 2, lr, lr * 2) for name, lr in ONE_X.items()}

# The pilot's candidates for X, in the order they are tried (section 4): (name, preset overrides, lr).
CANDIDATES = (
    ("collapse-120", dict(train_pool=64, steps=120, **OOS), 3e-4),
    ("collapse-lr6e-4", dict(train_pool=64, steps=60, **OOS), 6e-4),
    ("pool16-120", dict(train_pool=16, steps=120, **OOS), 3e-4),
)
# Section 6: the planned cost, and the overrun beyond which the frontier cells keep 10 seeds and nothing else is cut
BUDGET_WORKER_HOURS = 25.0
BUDGET_OVERRUN = 0.2
COLLAPSE_FRACTION = 0.5  # a run's entropy end/start below this is a collapse (the first study's absolute rule)

CELLS = {
    "frontier": StudyGrid(regimes=dict(REGIMES2), lrs=dict(RATES), methods=FRONTIER_METHODS, seeds=SEEDS),
    "mb1": StudyGrid(regimes=dict(REGIMES2_MB1), lrs={f"{n}-mb1": (lr,) for n, lr in ONE_X.items()},
                     methods=FRONTIER_METHODS, seeds=SEEDS),
    "code": StudyGrid(regimes=dict(REGIMES2), lrs={n: (lr,) for n, lr in ONE_X.items()}, methods=("proma-code",),
                      seeds=SEEDS),
}


def pilot_grid(name: str) -> StudyGrid:
    """The pilot's GRPO-only grid of candidate ``name``."""
    over, lr = next((o, lr) for n, o, lr in CANDIDATES if n == name)
    return StudyGrid(regimes={name: over}, lrs={name: (lr,)}, methods=("grpo",), seeds=PILOT_SEEDS)


def candidate_interval(data_dir, name: str) -> dict | None:
    """95% t-interval of GRPO's entropy end/start over the pilot seeds of candidate ``name`` (None until all ran)."""
    grid = pilot_grid(name)
    lr = grid.lrs[name][0]
    paths = [tables.result_path(data_dir, name, "grpo", lr, s) for s in PILOT_SEEDS]
    if not all(p.is_file() for p in paths):
        return None
    ratios = [tables.run_numbers(json.loads(p.read_text()))["entropy_end_ratio"] for p in paths]
    return stats.t_interval(ratios)


def pilot_state(data_dir) -> tuple[str | None, str | None, list]:
    """``(accepted candidate or None, next candidate to run or None, [(name, interval or None)])``.

    The rule of PREREGISTRATION-2.md section 4: candidates in order; accept the first whose interval lies below
    :data:`COLLAPSE_FRACTION`; nothing after an accepted one runs. ``next`` is None when the pilot is over.
    """
    seen = []
    for name, _, _ in CANDIDATES:
        iv = candidate_interval(data_dir, name)
        seen.append((name, iv))
        if iv is None:
            return None, name, seen
        if iv["hi"] < COLLAPSE_FRACTION:
            return name, None, seen
    return None, None, seen


def accepted_candidate(data_dir) -> str | None:
    return pilot_state(data_dir)[0]


def cells(data_dir) -> dict[str, StudyGrid]:
    """Every cell of the study; ``x`` only once the pilot accepted a candidate."""
    out = dict(CELLS)
    name = accepted_candidate(data_dir)
    if name is not None:
        over, lr = next((o, lr) for n, o, lr in CANDIDATES if n == name)
        out["x"] = StudyGrid(regimes={name: over}, lrs={name: (lr,)}, methods=X_METHODS, seeds=X_SEEDS)
    return out


def ordered_runs(grids: dict[str, StudyGrid]) -> list[tuple[str, tuple]]:
    """(cell name, (regime, method, lr, seed)) of every planned run, seed by seed across the cells."""
    keyed = [(key[3], i, j, cell, key) for i, (cell, grid) in enumerate(grids.items())
             for j, key in enumerate(grid.runs())]
    return [(cell, key) for _, _, _, cell, key in sorted(keyed, key=lambda t: t[:3])]


def run(grids: dict[str, StudyGrid], data_dir, runs_dir, *, cache_dir=None, archive_dir=None, log=print) -> list:
    """Run every missing run of ``grids`` in :func:`ordered_runs` order, one at a time in this process."""
    data_dir, runs_dir = Path(data_dir), Path(runs_dir)
    cache = Path(cache_dir) if cache_dir else runs_dir / "cache"
    warm = {}
    for grid in grids.values():
        for regime in grid.regimes:
            if regime not in warm:
                # the first study scored the same warm-starts: its score is reused, not recomputed
                first = "learn-240" if regime.startswith("learn-240") else "collapse"
                warm[regime] = prepare_regime(grid, regime, data_dir, runs_dir, cache, archive_dir,
                                              reuse_from=Path(FIRST_STUDY_DIR) / first, log=log)
    todo = [(run_config(grids[cell], *key, warm_dir=warm[key[0]], runs_dir=runs_dir),
             tables.result_path(data_dir, *key))
            for cell, key in ordered_runs(grids) if not tables.result_path(data_dir, *key).exists()]
    log(f"study2: {len(todo)} runs to do")
    return run_all(todo, jobs=1, eval_items=None, log=log)


def run_pilot(data_dir, runs_dir, *, cache_dir=None, archive_dir=None, log=print) -> str | None:
    """Run the pilot by its stopping rule; returns the accepted candidate (None if none was)."""
    while True:
        accepted, nxt, seen = pilot_state(data_dir)
        for name, iv in seen:
            if iv is not None:
                log(f"pilot {name}: grpo entropy end/start {stats.format_interval(iv)}")
        if nxt is None:
            log(f"pilot: accepted {accepted}" if accepted else "pilot: no candidate accepted")
            return accepted
        run({"pilot": pilot_grid(nxt)}, data_dir, runs_dir, cache_dir=cache_dir, archive_dir=archive_dir, log=log)


# Estimated cost of the out-of-sample probe relative to a run without it (measured on a 4-step learn-240 run).
PROBE_COST = 1.2


def first_study_minutes(regime: str, method: str, steps: int) -> float | None:
    """Minutes per run of the first study's closest (regime, method), scaled to ``steps`` and :data:`PROBE_COST`.

    The base regime: learn-240 for learn-240*, collapse for the rest; proma-code costs like proma-paper plus one
    plain forward and backward, taken as grpo's cost.
    """
    base = "learn-240" if regime.startswith("learn-240") else "collapse"
    folder = Path(FIRST_STUDY_DIR) / base

    def mean_minutes(m):
        runs = [json.loads(p.read_text()) for p in sorted(folder.glob(f"{m}-lr*-s*.json"))]
        return (float(np.mean([tables.run_wall_seconds(r) / 60 for r in runs])),
                runs[0]["config"]["steps"]) if runs else (None, None)

    parts = ["proma-paper", "grpo"] if method == "proma-code" else [method]
    total = 0.0
    for m in parts:
        minutes, base_steps = mean_minutes(m)
        if minutes is None:
            return None
        total += minutes * steps / base_steps
    return total * PROBE_COST


def estimate(row, grid: StudyGrid):
    """A plan row whose cost is unknown gets :func:`first_study_minutes` (marked as an estimate)."""
    if row.minutes_per_run is not None:
        return row
    per = first_study_minutes(row.regime, row.method, grid.regimes[row.regime]["steps"])
    return replace(row, minutes_per_run=per, measured=False)


def hours_left(data_dir) -> tuple[float, float | None]:
    """The whole study's worker-hours left, at the done runs' mean pace and at each cell's fastest
    (:func:`verification.studies.plan.hours_left`)."""
    return plan.hours_left([estimate(r, g) for g in cells(data_dir).values() for r in plan.plan(g, data_dir)])


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=DATA_DIR)
    ap.add_argument("--runs-dir", default="runs/study2")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--archive-dir", default="data/warmstarts", help="committed warm-starts ('' for none)")
    ap.add_argument("--pilot", action="store_true", help="run the pilot for X by its stopping rule")
    ap.add_argument("--cells", nargs="+", default=None, help="run only these cells")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="run only these seeds")
    ap.add_argument("--plan", action="store_true", help="print what is left and its estimated cost; run nothing")
    ap.add_argument("--workers", type=int, default=2, help="--plan: hours on this many workers")
    ns = ap.parse_args(argv)
    t0 = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t0:7.0f}s]", *a, flush=True)  # noqa: E731
    kw = dict(cache_dir=ns.cache_dir, archive_dir=ns.archive_dir or None, log=log)
    if ns.pilot:
        run_pilot(ns.data_dir, ns.runs_dir, **kw)
        return 0
    grids = cells(ns.data_dir)
    unknown = sorted(set(ns.cells or ()) - set(grids))
    if unknown:
        why = " (the pilot has not accepted a candidate for X yet)" if "x" in unknown else ""
        raise SystemExit(f"--cells: {unknown} not in the study{why}; it has {sorted(grids)}")
    grids = {c: g for c, g in grids.items() if ns.cells is None or c in ns.cells}
    if ns.seeds is not None:
        grids = {c: restrict(g, seeds=[s for s in ns.seeds if s in g.seeds]) for c, g in grids.items()}
    if ns.plan:
        per_grid = {c: [estimate(r, g) for r in plan.plan(g, ns.data_dir)] for c, g in grids.items()}
        minutes = {}
        for c, g in grids.items():  # a seed's runs in every cell: one worker's `--seeds` covers them all
            for seed, m in plan.seed_minutes(g, ns.data_dir, per_grid[c]).items():
                minutes[seed] = minutes.get(seed, 0.0) + m
        print(plan.markdown([r for rows in per_grid.values() for r in rows], workers=ns.workers))
        if minutes:
            print(plan.split_line(minutes, ns.workers))
        return 0
    run(grids, ns.data_dir, ns.runs_dir, **kw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
