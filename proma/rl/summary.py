"""Summaries of finished runs: the numbers a report quotes, from ``metrics.jsonl`` and ``eval.jsonl``.

``summarize_run(run_dir)`` -> dict; ``markdown_table(run_dirs)`` -> a markdown table (``proma summary DIR...``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_run(run_dir, *, last: int = 20) -> dict:
    """Per-run summary.

    ``reward_first`` / ``reward_final``: mean rollout reward over the first / last ``last`` rollout steps;
    ``val_start`` / ``val_final``: greedy validation accuracy at step 0 and at the end; ``local_kl_mean`` /
    ``local_kl_max``: over optimizer steps; ``train_seconds``: sum of logged step times (rollout, update and
    diagnostics; excludes setup, evaluation and checkpoints).
    """
    run_dir = Path(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    recs = _read_jsonl(run_dir / "metrics.jsonl")
    evals = _read_jsonl(run_dir / "eval.jsonl")
    if not recs:
        raise ValueError(f"{run_dir}: metrics.jsonl has no records")
    per_step = {}
    for r in recs:
        per_step.setdefault(r["step"], r["reward"])
    rewards = [per_step[k] for k in sorted(per_step)]

    def col(key):
        return np.array([r[key] for r in recs if key in r], dtype=float)

    out = {
        "run": run_dir.name, "method": cfg["method"], "lr": cfg["lr"], "steps": len(rewards),
        "opt_steps": len(recs),
        "reward_first": float(np.mean(rewards[:last])), "reward_final": float(np.mean(rewards[-last:])),
        "val_start": evals[0]["val/accuracy"] if evals else float("nan"),
        "val_final": evals[-1]["val/accuracy"] if evals else float("nan"),
        "train_seconds": float(col("step_time").sum()),
    }
    for key in ("local_kl", "local_kl_2nd_order", "kl", "grad_norm", "proj/removed_ratio"):
        v = col(key)
        name = key.replace("proj/", "")
        out[f"{name}_mean"] = float(v.mean()) if v.size else float("nan")
        out[f"{name}_max"] = float(v.max()) if v.size else float("nan")
    return out


def markdown_table(run_dirs) -> str:
    rows = [summarize_run(d) for d in run_dirs]
    head = ("| run | method | lr | steps | train s | reward first→final | val acc start→final | local KL mean "
            "| local KL max | 2nd-order mean | removed ratio mean |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['method']} | {r['lr']:g} | {r['steps']} | {r['train_seconds']:.0f} | "
            f"{r['reward_first']:.3f}→{r['reward_final']:.3f} | {r['val_start']:.3f}→{r['val_final']:.3f} | "
            f"{r['local_kl_mean']:.2e} | {r['local_kl_max']:.2e} | {r['local_kl_2nd_order_mean']:.2e} | "
            f"{r['removed_ratio_mean']:.3f} |")
    return "\n".join(lines)
