"""Summaries of training runs for the report: KL, entropy, reward and validation statistics.

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


def read_jsonl(path) -> list:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def tail_mean(x: np.ndarray, frac: float = 0.25) -> float:
    """Mean over the last ``frac`` of the finite values (at least one)."""
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan
    return float(x[-max(1, int(round(frac * x.size))):].mean())


def head_mean(x: np.ndarray, frac: float = 0.25) -> float:
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


def summarize_run(run_dir) -> dict:
    """Per-run summary: KL statistics, entropy, reward gain, validation accuracy, timing."""
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / "metrics.jsonl")
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


def kl_at_equal_gain(points_a: list, points_b: list) -> dict | None:
    """Mean local KL of two methods interpolated at a common reward gain.

    ``points_*``: ``[(reward_gain, mean_local_kl)]`` over learning rates. Uses the overlap of the two gain
    ranges (only positive gains); within it, the midpoint, with KL interpolated linearly in the gain between
    the method's own learning rates (log KL). Returns None when the ranges do not overlap.
    """
    def clean(points):
        return sorted((g, k) for g, k in points if math.isfinite(g) and math.isfinite(k) and g > 0 and k > 0)

    a, b = clean(points_a), clean(points_b)
    if not a or not b:
        return None
    lo, hi = max(a[0][0], b[0][0]), min(a[-1][0], b[-1][0])
    if lo > hi:
        return None
    target = 0.5 * (lo + hi)

    def interp(points):
        gains = [g for g, _ in points]
        logs = [math.log(k) for _, k in points]
        return math.exp(float(np.interp(target, gains, logs)))

    return {"gain": target, "kl_a": interp(a), "kl_b": interp(b)}
