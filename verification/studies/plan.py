"""What is left of a seed study and what it will cost: for planning the sittings of a resumable study.

For every (regime, method) of a grid: the runs planned, the runs done (result files in the data folder) and an
estimate of the worker-minutes left. A run's cost is its own recorded wall time (``seconds.total`` of its JSON, one
single-threaded worker). The estimate for a (regime, method) is the mean of its done runs; with none, GRPO's mean in
that regime times the method's mean cost relative to GRPO in the regimes where both have runs; otherwise unknown.
Runs that shared their core with other work took longer, so the plan also states the total at the pace of each
(regime, method)'s fastest done run (``fastest_minutes``): what a machine with nothing else running would need.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from .tables import BASELINE, result_path, run_wall_seconds


@dataclass(frozen=True)
class PlanRow:
    regime: str
    method: str
    planned: int
    done: int
    minutes_per_run: float | None   # estimated; None when nothing can estimate it
    measured: bool                  # the estimate comes from this (regime, method)'s own runs
    fastest_minutes: float | None = None   # its fastest done run (None: none done)

    @property
    def minutes_left(self) -> float | None:
        return None if self.minutes_per_run is None else (self.planned - self.done) * self.minutes_per_run


def _run_minutes(data_dir, regime: str, method: str, lrs, seeds) -> list[float]:
    """Recorded wall minutes of the done runs of (regime, method) among the planned learning rates and seeds."""
    out = []
    for lr in lrs:
        for seed in seeds:
            path = result_path(data_dir, regime, method, lr, seed)
            if path.is_file():
                out.append(run_wall_seconds(json.loads(path.read_text())) / 60)
    return out


def plan(grid, data_dir) -> list[PlanRow]:
    """One :class:`PlanRow` per (regime, method) of ``grid`` (a :class:`verification.studies.seeds.StudyGrid`)."""
    minutes = {(r, m): _run_minutes(data_dir, r, m, grid.lrs[r], grid.seeds)
               for r in grid.regimes for m in grid.methods}
    relative = {}
    for m in grid.methods:
        ratios = [np.mean(minutes[(r, m)]) / np.mean(minutes[(r, BASELINE)]) for r in grid.regimes
                  if minutes[(r, m)] and minutes.get((r, BASELINE))]
        relative[m] = float(np.mean(ratios)) if ratios else None
    rows = []
    for r in grid.regimes:
        for m in grid.methods:
            done, planned = len(minutes[(r, m)]), len(grid.lrs[r]) * len(grid.seeds)
            if done:
                per, measured = float(np.mean(minutes[(r, m)])), True
            elif minutes.get((r, BASELINE)) and relative.get(m) is not None:
                per, measured = float(np.mean(minutes[(r, BASELINE)])) * relative[m], False
            else:
                per, measured = None, False
            rows.append(PlanRow(r, m, planned, done, per, measured, min(minutes[(r, m)], default=None)))
    return rows


def seed_minutes(grid, data_dir, rows: list[PlanRow]) -> dict[int, float]:
    """Estimated worker-minutes left per seed of ``grid``: each missing run costs its (regime, method) row's
    minutes per run (runs without an estimate count 0)."""
    per = {(row.regime, row.method): row.minutes_per_run or 0.0 for row in rows}
    out = {}
    for regime, method, lr, seed in grid.runs():
        if not result_path(data_dir, regime, method, lr, seed).is_file():
            out[seed] = out.get(seed, 0.0) + per.get((regime, method), 0.0)
    return out


def balanced_seeds(minutes: dict[int, float], workers: int) -> list[tuple[list[int], float]]:
    """Seeds split over ``workers`` so that their estimated minutes come out close: the longest seed first, each to
    the least loaded worker (longest-processing-time first). Returns ``[(sorted seeds, minutes)]`` per worker."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    loads = [([], 0.0) for _ in range(workers)]
    for seed in sorted(minutes, key=lambda s: (-minutes[s], s)):
        k = min(range(workers), key=lambda i: loads[i][1])
        loads[k] = (loads[k][0] + [seed], loads[k][1] + minutes[seed])
    return [(sorted(seeds), total) for seeds, total in loads]


def hours_left(rows: list[PlanRow]) -> tuple[float, float | None]:
    """Worker-hours left: at each row's estimated pace (rows without an estimate count 0), and at each row's
    fastest done run's pace (None unless every row with runs left has a done run)."""
    mean = sum(row.minutes_left for row in rows if row.minutes_left is not None) / 60
    left = [row for row in rows if row.planned > row.done]
    if not left or any(row.fastest_minutes is None for row in left):
        return mean, None
    return mean, sum((row.planned - row.done) * row.fastest_minutes for row in left) / 60


def split_line(minutes: dict[int, float], workers: int) -> str:
    """One worker's ``--seeds`` per line part, from :func:`balanced_seeds`."""
    parts = [f"`--seeds {' '.join(map(str, seeds))}` ({total / 60:.1f} worker-hours)"
             for seeds, total in balanced_seeds(minutes, workers) if seeds]
    return f"Seeds left, balanced over {workers} workers by the estimate: " + "; ".join(parts) + "."


def markdown(rows: list[PlanRow], workers: int = 2) -> str:
    """The plan as a table, with the total left in worker-hours and in hours on ``workers`` workers."""
    lines = ["| regime | method | done / planned | minutes per run | worker-minutes left |", "|---|---|---|---:|---:|"]
    for row in rows:
        per = "-" if row.minutes_per_run is None else f"{row.minutes_per_run:.1f}" + ("" if row.measured else " (est.)")
        left = "-" if row.minutes_left is None else f"{row.minutes_left:.0f}"
        lines.append(f"| {row.regime} | {row.method} | {row.done} / {row.planned} | {per} | {left} |")
    unknown = sum(row.planned - row.done for row in rows if row.minutes_left is None)
    total, quiet = hours_left(rows)
    lines += ["", f"Left: {sum(row.planned - row.done for row in rows)} runs, about {total:.1f} worker-hours "
                  f"({total / workers:.1f} h on {workers} workers)"
                  + (f"; {unknown} runs without an estimate" if unknown else "") + "."]
    if quiet is not None:
        lines.append(f"At each one's fastest done run's pace (a machine running nothing else): about {quiet:.1f} "
                     f"worker-hours ({quiet / workers:.1f} h on {workers} workers).")
    return "\n".join(lines)
