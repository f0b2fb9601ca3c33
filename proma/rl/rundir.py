"""The run directory: ``config.json``, the JSONL logs and the ``ckpt.pt`` resume point.

A run directory holds one configuration; resuming it with a different one (outside ``RESUMABLE_CHANGES``)
is refused. Records written after the checkpoint are dropped on resume, since the resumed run redoes them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import RESUMABLE_CHANGES, TrainConfig


def append_jsonl(path: Path, record: dict):
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, before_step: int):
    """Keep only records of steps < before_step (records written after the checkpoint are redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < before_step]
    path.write_text("".join(line + "\n" for line in keep))


def check_same_config(run_dir: Path, cfg: TrainConfig):
    """ValueError naming the first option in which ``cfg`` differs from the run saved in ``run_dir``."""
    old = json.loads((run_dir / "config.json").read_text())
    new = cfg.to_dict()
    defaults = TrainConfig.from_preset(cfg.preset).to_dict()
    # a field missing from the saved config was added later: it matches when it keeps its default
    diff = [k for k in new if k not in RESUMABLE_CHANGES and old.get(k, defaults.get(k)) != new[k]]
    if diff:
        k = diff[0]
        raise ValueError(
            f"out={cfg.out!r}: run directory holds a run with a different config ({k}: {old.get(k)!r} there, "
            f"{new[k]!r} now); choose another --out or delete it"
        )


def save_checkpoint(run_dir: Path, model, opt, next_step: int, opt_step: int):
    """Write ``ckpt.pt`` atomically (a crash mid-write leaves the previous checkpoint)."""
    tmp = run_dir / f"ckpt.pt.tmp{os.getpid()}"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "next_step": next_step,
                "opt_step": opt_step}, tmp)
    os.replace(tmp, run_dir / "ckpt.pt")


def load_checkpoint(run_dir: Path, model, opt, device) -> tuple[int, int] | None:
    """Load ``ckpt.pt`` into ``model`` and ``opt``; returns ``(next_step, opt_step)``, or None without one."""
    path = run_dir / "ckpt.pt"
    if not path.exists():
        return None
    ck = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    return ck["next_step"], ck["opt_step"]
