"""The report's grid of GSM8K training runs: every method at every learning rate, one shared warm-start.

Runs go to ``runs_dir/<method>_lr<lr>`` through ``proma.rl.run``; an existing run directory with the
same configuration is resumed (a finished one costs only its setup), so an interrupted report can be
rerun. The warm-start checkpoint is trained once, in this process, before the grid starts, and cached in
``runs_dir/cache`` for every run. With ``jobs > 1`` runs execute in that many worker processes with one torch
thread each (on 2 CPU cores this is faster than one process with 2 threads for the small policy).
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

METHODS = ("reinforce", "grpo", "proma", "proma-paper", "intra")


@dataclass(frozen=True)
class GridConfig:
    """What ``proma-verify report`` trains (see ``verification.report.generate.MODES``)."""

    preset: str
    steps: int
    lrs: tuple
    methods: tuple = METHODS
    overrides: dict = field(default_factory=dict)
    seed: int = 0

    def train_config(self, method: str, lr: float, runs_dir: Path, *, threads: int = 0):
        from proma.rl.config import TrainConfig

        return TrainConfig.from_preset(
            self.preset, **{**self.overrides, "method": method, "lr": lr, "steps": self.steps, "seed": self.seed,
                            "out": str(run_dir(runs_dir, method, lr)), "cache_dir": str(Path(runs_dir) / "cache"),
                            "progress": False, "num_threads": threads})


def run_dir(runs_dir, method: str, lr: float) -> Path:
    return Path(runs_dir) / f"{method}_lr{lr:g}"


def quiet_transformers() -> None:
    """Silence transformers' per-checkpoint progress bars (they would interleave with the report's)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _train_one(cfg_dict: dict) -> str:
    import torch

    from proma.rl.config import TrainConfig
    from proma.rl import run

    quiet_transformers()
    if cfg_dict.get("num_threads"):
        torch.set_num_threads(cfg_dict["num_threads"])
    return str(run(TrainConfig(**cfg_dict), log=lambda *a, **k: None))


def _warm_start(grid: GridConfig, runs_dir: Path, log) -> None:
    """Train (or load) the shared warm-start once, so parallel runs do not all train it."""
    from proma.rl.build import build_run

    cfg = grid.train_config(grid.methods[0], grid.lrs[0], runs_dir)
    build_run(cfg, log=log)


def run_grid(grid: GridConfig, runs_dir, *, jobs: int | None = None, log=print) -> dict:
    """Train every (method, lr) of ``grid``; returns ``{(method, lr): run directory}``."""
    from tqdm.auto import tqdm

    quiet_transformers()
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / ".gitignore").write_text("# training runs and checkpoints of the report: not committed\n*\n")
    jobs = jobs or min(2, os.cpu_count() or 1)
    _warm_start(grid, runs_dir, log)
    todo = [(m, lr) for lr in grid.lrs for m in grid.methods]
    threads = 1 if jobs > 1 else 0
    cfgs = {key: grid.train_config(*key, runs_dir, threads=threads).to_dict() for key in todo}
    out = {}
    bar = tqdm(total=len(todo), desc="training runs", unit="run")
    try:
        if jobs <= 1:
            for key in todo:
                bar.set_postfix_str(f"{key[0]} lr={key[1]:g}")
                out[key] = Path(_train_one(cfgs[key]))
                bar.update(1)
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(_train_one, cfgs[key]): key for key in todo}
                for fut in as_completed(futures):
                    key = futures[fut]
                    out[key] = Path(fut.result())
                    bar.set_postfix_str(f"done {key[0]} lr={key[1]:g}")
                    bar.update(1)
    finally:
        bar.close()
    return out
