"""Summaries of finished runs: the one per-run summary (``summarize_run``) that ``proma summary`` prints and the
verification report quotes, and the series helpers it is built from.

Pure functions over the harness's records (``metrics.jsonl``: one record per optimizer step; ``eval.jsonl``:
greedy validation accuracy). Names follow the harness: ``local_kl`` (exact KL between the policy just before
and just after an optimizer step, mean over scored tokens), ``local_kl_seq`` (the same summed per sequence,
mean over sequences), ``local_kl_2nd_order`` (0.5 mean_i (g_i . dtheta)^2, the second-order estimate of the
sequence-level KL), ``kl`` (to the rollout policy), ``entropy``, ``reward``, ``val/accuracy``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# Fraction of a run's rollout steps averaged for its start and end values (one step's reward is too noisy).
EDGE_FRACTION = 0.25


def read_jsonl(path) -> list:
    """The records of a JSONL file ([] when it does not exist; a torn last line skipped with a warning, see
    :func:`proma.rl.rundir.read_records`)."""
    from .rundir import read_records

    return read_records(path)


def series(records: list, key: str) -> np.ndarray:
    """Values of ``key`` over records (NaN where absent)."""
    return np.array([float(r[key]) if r.get(key) is not None else math.nan for r in records], dtype=float)


def per_rollout(records: list, key: str) -> np.ndarray:
    """One value per rollout step (from its first minibatch's record): reward, entropy are per rollout."""
    return series([r for r in records if r.get("minibatch", 0) == 0], key)


def _stats(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": math.nan, "p95": math.nan, "max": math.nan, "n": 0}
    return {"mean": float(x.mean()), "p95": float(np.percentile(x, 95)), "max": float(x.max()), "n": int(x.size)}


def tail_mean(x: np.ndarray, frac: float = EDGE_FRACTION) -> float:
    """Mean over the last ``frac`` of the finite values (at least one)."""
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan
    return float(x[-max(1, int(round(frac * x.size))):].mean())


def head_mean(x: np.ndarray, frac: float = EDGE_FRACTION) -> float:
    """Mean over the first ``frac`` of the finite values (at least one): a one-step reward is too noisy."""
    return tail_mean(x[::-1], frac)


def second_order_agreement(exact: np.ndarray, estimate: np.ndarray) -> dict:
    """How well the second-order estimate tracks the exact sequence-level KL, step by step.

    Returns the median and the 5-95% range of ``estimate / exact`` and the Pearson correlation of their logs.
    """
    ok = np.isfinite(exact) & np.isfinite(estimate) & (exact > 0) & (estimate > 0)
    if ok.sum() < 2:
        return {"median_ratio": math.nan, "ratio_p5": math.nan, "ratio_p95": math.nan, "log_corr": math.nan,
                "n": int(ok.sum())}
    ratio = estimate[ok] / exact[ok]
    le, ls = np.log(exact[ok]), np.log(estimate[ok])
    corr = float(np.corrcoef(le, ls)[0, 1]) if le.std() > 0 and ls.std() > 0 else math.nan
    return {"median_ratio": float(np.median(ratio)), "ratio_p5": float(np.percentile(ratio, 5)),
            "ratio_p95": float(np.percentile(ratio, 95)), "log_corr": corr, "n": int(ok.sum())}


def check_one_writer(path, records: list) -> None:
    """ValueError unless ``opt_step`` counts 1, 2, ... through ``records`` (as one writer logs them).

    Two runs that wrote into one directory (or a log appended to after it was copied) repeat or interleave
    optimizer steps; a summary of them would count and mix records of different runs.
    """
    steps = [r.get("opt_step") for r in records]
    for i, s in enumerate(steps):
        if s != i + 1:
            raise ValueError(f"{path}: record {i + 1} has opt_step {s!r}, expected {i + 1}: the log holds repeated "
                             f"or interleaved steps (two runs wrote to one directory?); not summarised")


def summarize_run(run_dir) -> dict:
    """Per-run summary: KL statistics, entropy, reward gain, validation accuracy, timing."""
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
    check_one_writer(run_dir / "metrics.jsonl", records)
    evals = read_jsonl(run_dir / "eval.jsonl")
    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    reward = per_rollout(records, "reward")
    entropy = per_rollout(records, "entropy")
    val = np.array([e["val/accuracy"] for e in evals], dtype=float)
    out = {
        "method": cfg.get("method"), "lr": cfg.get("lr"), "steps": len(reward), "opt_steps": len(records),
        "local_kl": _stats(series(records, "local_kl")),
        "local_kl_seq": _stats(series(records, "local_kl_seq")),
        "local_kl_2nd_order": _stats(series(records, "local_kl_2nd_order")),
        "kl_rollout": _stats(series(records, "kl")),
        "second_order": second_order_agreement(series(records, "local_kl_seq"), series(records, "local_kl_2nd_order")),
        "removed_ratio": _stats(series(records, "proj/removed_ratio")),
        "grad_norm": _stats(series(records, "grad_norm")),
        "clip_ratio": _stats(series(records, "clip_ratio")),
        "reward_start": head_mean(reward),
        "reward_end": tail_mean(reward),
        "entropy_start": float(entropy[0]) if entropy.size else math.nan,
        "entropy_end": tail_mean(entropy),
        "entropy_min": float(np.nanmin(entropy)) if np.isfinite(entropy).any() else math.nan,
        "val_start": float(val[0]) if val.size else math.nan,
        "val_end": float(val[-1]) if val.size else math.nan,
        "val_max": float(val.max()) if val.size else math.nan,
        "step_time": _stats(series(records, "step_time"))["mean"],
        "wall_time": float(np.nansum(series(records, "step_time"))),
    }
    out["reward_gain"] = out["reward_end"] - out["reward_start"]
    out["val_gain"] = out["val_end"] - out["val_start"]
    out["entropy_ratio"] = (out["entropy_end"] / out["entropy_start"]
                            if out["entropy_start"] and math.isfinite(out["entropy_start"]) else math.nan)
    return out


def markdown_table(run_dirs) -> str:
    """One markdown row per run directory (``proma summary DIR...``), from :func:`summarize_run`."""
    rows = []
    for d in run_dirs:
        s = summarize_run(d)
        if not s["opt_steps"]:
            raise ValueError(f"{d}: metrics.jsonl has no records")
        rows.append((Path(d).name, s))
    head = ("| run | method | lr | steps | train s | reward first→last quarter | val acc start→final | local KL mean "
            "| local KL max | 2nd-order mean | removed ratio mean |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['method']} | {r['lr']:g} | {r['steps']} | {r['wall_time']:.0f} | "
            f"{r['reward_start']:.3f}→{r['reward_end']:.3f} | {r['val_start']:.3f}→{r['val_end']:.3f} | "
            f"{r['local_kl']['mean']:.2e} | {r['local_kl']['max']:.2e} | {r['local_kl_2nd_order']['mean']:.2e} | "
            f"{r['removed_ratio']['mean']:.3f} |")
    return "\n".join(lines)
