"""The report's evidence over seeds: the seed study of each mode, the verdict table and the first-order check.

One grid per report mode (:data:`SEED_GRIDS`): ``full`` runs the planned study of
:mod:`verification.studies.seeds` (every method x 15 seeds in each regime, final policy scored on the whole test
split), ``quick`` a tiny grid of 2 methods x 2 seeds and a few rollout steps (its intervals are wide and it issues no
verdict), ``smoke`` the cheapest grid that exercises the code path (CI). Results go to
``<report>/data/seeds/<regime>/`` as the study runs, so an interrupted report resumes where it stopped.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..studies import claims, first_order, plan, seeds, tables

from . import study2_section

SEED_GRIDS = {
    "full": seeds.StudyGrid(),
    # the report's quick warm-start (300 steps, shared through the cache); GRPO and exact PROMA, 2 seeds (the
    # fewest an interval needs), 2 rollout steps, 64 test items: it shows the code path within quick's budget
    "quick": seeds.StudyGrid(regimes={"quick": dict(steps=2, warmstart_steps=300)}, lrs={"quick": (3e-4,)},
                                   methods=("grpo", "proma"), seeds=(0, 1), eval_items=64),
    # two methods and two seeds (the fewest an interval needs), one rollout step, 16 test items
    "smoke": seeds.StudyGrid(regimes={"smoke": dict(steps=1)}, lrs={"smoke": (1e-3,)},
                                   methods=("grpo", "proma"), seeds=(0, 1), preset="smoke", eval_items=16),
}
# Parallel seed-study runs when the report is not told (one single-threaded worker per CPU core of the
# 2-core machines the report is budgeted for).
DEFAULT_JOBS = 2
# The first-order check of each mode: settings compared and relative step lengths (smoke: the two that give a
# slope, on the two settings that bracket it).
FIRST_ORDER = {
    "full": dict(settings=first_order.SETTINGS, step_lengths=first_order.STEP_LENGTHS),
    "quick": dict(settings=first_order.SETTINGS, step_lengths=first_order.STEP_LENGTHS),
    "smoke": dict(settings={k: first_order.SETTINGS[k] for k in ("plain", "exact")}, step_lengths=(1e-5, 1e-6)),
}


def seeds_phase(mode: str, data_dir, runs_dir, *, jobs: int | None, log=print) -> dict:
    """Run (or resume) the mode's seed study.

    Returns ``{"grid", "results": {regime: runs}, "start", "run_seconds", "warmstarts", "tables", "equal_kl",
    "regime_checks", "plan"}`` (the verdicts are computed from ``results`` by :mod:`verification.studies.preregistered`;
    ``plan`` is :func:`verification.studies.plan.plan`, what is left); ``run_seconds`` sums every run's own wall
    time (one single-threaded worker each, :func:`verification.studies.tables.run_wall_seconds`), so it states the
    study's cost even when it was run in several sittings; ``warmstarts`` the records (``{"key", "steps",
    "seconds", ...}``) of the regimes' warm-starts found in ``data_dir``.

    ``data_dir``: the report's ``data/seeds``; ``runs_dir``: the report's runs directory (training directories
    under ``study/``, warm-starts shared with the report's grid in ``cache/``).
    """
    grid = SEED_GRIDS[mode]
    runs_dir = Path(runs_dir)
    # smoke: in this process (a worker pool's start-up costs more than its 4 one-step runs)
    jobs = 1 if mode == "smoke" else (jobs or DEFAULT_JOBS)
    seeds.run_study(grid, data_dir, runs_dir / "study", jobs=jobs, cache_dir=runs_dir / "cache", log=log)
    return load_seeds(mode, data_dir)


def load_seeds(mode: str, data_dir) -> dict:
    """The mode's seed study as far as ``data_dir`` holds it (the dictionary of :func:`seeds_phase`); runs nothing."""
    grid = SEED_GRIDS[mode]
    results = {regime: tables.load_results(data_dir, regime) for regime in grid.regimes}
    start = {regime: tables.warmstart_evals(Path(data_dir) / regime) for regime in grid.regimes}
    compute = sum(tables.run_wall_seconds(json.loads(f.read_text()))
                  for regime in grid.regimes for f in (Path(data_dir) / regime).glob("*-lr*-s*.json"))
    warm = {regime: json.loads(f.read_text()) for regime in grid.regimes
            if (f := Path(data_dir) / regime / "warmstart.json").is_file()}
    commits = {regime: run_commits(Path(data_dir) / regime) for regime in grid.regimes}
    study2_dir = Path(data_dir).parent / "study2"
    second = study2_section.load_study2(study2_dir) if mode == "full" and study2_dir.is_dir() else None
    return {"grid": grid, "results": results, "start": start, "run_seconds": compute, "warmstarts": warm,
            "tables": {regime: tables.aggregate(runs) for regime, runs in results.items()},
            "equal_kl": {regime: tables.equal_kl(tables.load_curves(data_dir, regime))
                         for regime in grid.regimes},
            "regime_checks": claims.regime_checks(results, mode=mode),
            "plan": plan.plan(grid, data_dir), "commits": commits, "study2": second,
            "data_dir": str(data_dir) if mode == "full" else None}


def run_commits(folder) -> dict:
    """``{(method, seed): commit or None}`` of the result files in ``folder`` (None: the run recorded no commit)."""
    out = {}
    for path in sorted(Path(folder).glob("*-lr*-s*.json")):
        res = json.loads(path.read_text())
        out[(res["config"]["method"], res["config"]["seed"])] = (res.get("code") or {}).get("commit")
    return out


def first_order_phase(mode: str, *, seed: int, realcase_cache, log=print) -> dict:
    """The first-order check on the real-case policy's microbatch chain (``{"where", "result"}``)."""
    return first_order.real_first_order(seed=seed, cache_dir=realcase_cache, log=log, **FIRST_ORDER[mode])


def kl_bounds(runs: list) -> list:
    """:func:`verification.studies.first_order.kl_bound_summary` of every report run (``{"method", "lr", ...}``).

    A run none of whose steps has a positive second-order estimate (no update) gets ``"steps": 0``.
    """
    out = []
    for r in runs:
        try:
            summary = first_order.kl_bound_summary(r["records"])
        except ValueError:
            summary = {"steps": 0}
        out.append({"method": r["method"], "lr": r["lr"], **summary})
    return out
