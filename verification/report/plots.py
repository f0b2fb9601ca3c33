"""PNG figures of the report (matplotlib, Agg backend: no display needed).

Every function takes already-loaded data and a path, writes one PNG and returns the path.
``runs`` is a list of dicts ``{"method", "lr", "records", "evals"}`` (harness JSONL records).
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from proma.rl.summary import per_rollout, series  # noqa: E402

METHOD_COLORS = {"reinforce": "tab:gray", "grpo": "tab:red", "proma": "tab:blue", "proma-paper": "tab:cyan",
                 "intra": "tab:green"}
FIGURE_DPI = 110
# Smallest value drawn on a log axis: an exact zero (a distance or overlap at rounding) sits at the bottom.
LOG_FLOOR = 1e-17
FOREST_TICKS = 4            # at most this many labelled ticks on a linear forest axis (narrow panels)
FOREST_LOG_SUBS = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)  # minor ticks per decade on a log forest axis
MINOR_LABELS_WITHIN = 10.0  # a log forest axis spanning less than this factor labels its minor ticks (0.6, 0.7, ...)


def _color(method):
    return METHOD_COLORS.get(method, "black")


def _lrs(runs):
    return sorted({r["lr"] for r in runs})


def _smooth(x: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or x.size < k:
        return x
    kernel = np.ones(k) / k
    padded = np.concatenate([np.full(k - 1, x[0]), x])
    return np.convolve(padded, kernel, mode="valid")


def _save(fig, path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=FIGURE_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _positive(y):
    return np.where(np.isfinite(y) & (y > 0), y, np.nan)


def forest_panel(ax, items, *, ref: float, log: bool, title: str) -> None:
    """One panel of a forest plot: ``items`` = [(label, mean, lo, hi, colour)] top to bottom, a line at ``ref``."""
    for y, (_, mean, lo, hi, color) in enumerate(items):
        ax.errorbar(mean, y, xerr=[[mean - lo], [hi - mean]], fmt="o", color=color, capsize=3)
    ax.axvline(ref, color="black", lw=0.8)
    ax.set_yticks(range(len(items)), [label for label, *_ in items])
    ax.set_xscale("log" if log else "linear")
    if log:  # plain numbers (0.7, not 7 x 10^-1); minor ticks labelled only where they cannot crowd
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ends = [ref] + [x for _, _, lo, hi, _ in items for x in (lo, hi)]
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_locator(LogLocator(subs=FOREST_LOG_SUBS))
        ax.xaxis.set_minor_formatter(plain if max(ends) / min(ends) < MINOR_LABELS_WITHIN else NullFormatter())
    else:
        ax.xaxis.set_major_locator(MaxNLocator(FOREST_TICKS))
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()


def metric_curves(runs, key: str, path, *, ylabel: str, log: bool = False, per_rollout_step: bool = False,
                  smooth: int = 1) -> Path:
    """One panel per learning rate, one line per method: ``key`` against the optimizer step."""
    lrs = _lrs(runs)
    fig, axes = plt.subplots(1, len(lrs), figsize=(5.2 * len(lrs), 3.6), squeeze=False, sharey=True)
    for ax, lr in zip(axes[0], lrs):
        for run in (r for r in runs if r["lr"] == lr):
            y = per_rollout(run["records"], key) if per_rollout_step else series(run["records"], key)
            y = _smooth(y, smooth)
            if log:
                y = _positive(y)
            ax.plot(np.arange(len(y)), y, label=run["method"], color=_color(run["method"]), lw=1.3)
        ax.set_title(f"lr = {lr:g}")
        ax.set_xlabel("rollout step" if per_rollout_step else "optimizer step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    return _save(fig, path)


def val_curves(runs, path) -> Path:
    lrs = _lrs(runs)
    fig, axes = plt.subplots(1, len(lrs), figsize=(5.2 * len(lrs), 3.6), squeeze=False, sharey=True)
    for ax, lr in zip(axes[0], lrs):
        for run in (r for r in runs if r["lr"] == lr):
            steps = [e["step"] for e in run["evals"]]
            acc = [e["val/accuracy"] for e in run["evals"]]
            ax.plot(steps, acc, marker="o", ms=3, label=run["method"], color=_color(run["method"]))
        ax.set_title(f"lr = {lr:g}")
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("greedy validation accuracy")
    axes[0][-1].legend(fontsize=8)
    return _save(fig, path)


def second_order_scatter(runs, path) -> Path:
    """Exact sequence-level local KL vs its second-order estimate, every optimizer step of every run."""
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    lo, hi = math.inf, 0.0
    for run in runs:
        x = series(run["records"], "local_kl_seq")
        y = series(run["records"], "local_kl_2nd_order")
        ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
        if ok.any():
            lo, hi = min(lo, x[ok].min(), y[ok].min()), max(hi, x[ok].max(), y[ok].max())
        marker = "o" if run["lr"] == _lrs(runs)[0] else "^"
        ax.scatter(x[ok], y[ok], s=10, alpha=0.6, color=_color(run["method"]), marker=marker,
                   label=f"{run['method']} lr={run['lr']:g}")
    if hi > 0:
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="estimate = exact")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("exact sequence-level local KL (local_kl_seq)")
    ax.set_ylabel("second-order estimate 0.5 mean (g.dθ)²")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def kl_vs_gain(summaries, path) -> Path:
    """Mean local KL per optimizer step against reward gain, one line per method through its learning rates."""
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    methods = sorted({s["method"] for s in summaries})
    for method in methods:
        pts = sorted((s["lr"], s["reward_gain"], s["local_kl"]["mean"]) for s in summaries if s["method"] == method)
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o", color=_color(method), label=method)
        for lr, g, k in pts:
            ax.annotate(f"{lr:g}", (g, k), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("reward gain (last quarter mean - first quarter mean)")
    ax.set_ylabel("mean local KL per optimizer step")
    if all(s["local_kl"]["mean"] > 0 for s in summaries if math.isfinite(s["local_kl"]["mean"])):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def projection_bars(study: dict, path) -> Path:
    """Relative distance to exact and residual overlap of each reference setting (log scale)."""
    names = [n for n in study["settings"] if not n.startswith("exact (layer")]
    dist = [max(study["settings"][n]["rel_dist_to_exact"], LOG_FLOOR) for n in names]
    ov = [max(study["settings"][n]["overlap_layer"], LOG_FLOOR) for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    y = np.arange(len(names))
    axes[0].barh(y, dist, color="tab:blue")
    axes[0].set_title("relative distance to exact layer-wise G")
    axes[1].barh(y, ov, color="tab:orange")
    axes[1].set_title("residual overlap (per layer, max)")
    for ax in axes:
        ax.set_xscale("log")
        ax.grid(alpha=0.3, axis="x")
        ax.set_yticks(y)
    axes[0].set_yticklabels(names, fontsize=7)
    axes[1].set_yticklabels([])
    return _save(fig, path)


def intra_bars(study: dict, path) -> Path:
    names = list(study["intra"])
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = np.arange(len(names))
    w = 0.27
    for j, (key, label) in enumerate((("removed_frac_mean", "fraction of pg removed"),
                                      ("rel_dist_to_plain", "distance to plain"),
                                      ("rel_dist_to_exact", "distance to exact PROMA"))):
        ax.bar(x + (j - 1) * w, [study["intra"][n][key] for n in names], width=w, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _save(fig, path)
