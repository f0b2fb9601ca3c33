"""The secondary analyses of ``reports/PREREGISTRATION-2.md`` section 7: reported beside the verdicts, deciding nothing.

Inputs are those of :mod:`verification.studies.preregistered2`: ``results = {regime: runs}`` with
``runs = {(method, lr, seed): per-run numbers}`` (:func:`verification.studies.tables.run_numbers`). Every contrast is
paired by seed over the seeds both methods ran; ratios are the exponentiated t-interval of the mean log-ratio,
differences the t-interval of the mean difference (:mod:`verification.studies.stats`). A contrast with fewer than
:data:`MIN_SEEDS` common seeds is left out (None), never shown as a number without an interval.

* :func:`per_rate`: at each learning rate, each method against GRPO in out-of-sample and in-sample local KL, reward
  gain and entropy end/start (the first study's endpoints, now with out-of-sample KL).
* :func:`minibatch_contrasts`: the one-minibatch contrast with both KLs (published settings included), and the
  two-minibatch contrast at 1x on each minibatch separately (minibatch 0 on-policy, 1 where GRPO clips).
* :func:`x_summary`: in the GRPO-collapse regime, every method's absolute entropy rule, local KL (both kinds) and
  reward gain.
* :func:`code_contrasts`: ``proma-code`` against ``proma-paper`` in reward gain and in-sample local KL.
* :func:`reproduction`: GRPO at 1x, seeds 5-9, against the first study's runs of the same seeds: the largest
  difference of any training record (the out-of-sample probe must not change training).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import claims, stats, tables

MIN_SEEDS = 2
BASELINE = "grpo"
ONE_X = {"learn-240": 1e-4, "collapse": 3e-4}
# (column, kind, label): a ratio column is compared as a log-ratio, a difference column as a difference.
PER_RATE_COLUMNS = (("oos_kl_mean", "ratio", "out-of-sample KL ratio"),
                    ("local_kl_mean", "ratio", "in-sample KL ratio"),
                    ("reward_gain", "difference", "reward gain difference"),
                    ("entropy_end_ratio", "difference", "entropy end/start difference"))
# The reproduction check's runs (PREREGISTRATION-2.md section 7) and what a record may differ in: wall times and
# the out-of-sample probe, which the first study did not have.
REPRODUCTION_SEEDS = (5, 6, 7, 8, 9)
NOT_TRAINING = ("time/", "step_time", "oos_local_kl")


@dataclass(frozen=True)
class Contrast:
    """One paired contrast: ``method`` against ``against`` on ``column`` in ``regime`` at ``lr``."""

    regime: str
    lr: float
    method: str
    against: str
    column: str
    kind: str          # "ratio" | "difference"
    interval: dict     # stats.t_interval shape, exponentiated for ratios
    p: float


def geometric_interval(x) -> dict:
    """exp of the t-interval of log x (x > 0): the geometric mean and its interval, the scale of a KL."""
    x = np.asarray(x, dtype=float)
    if np.any(x <= 0):
        raise ValueError("x: a geometric interval needs positive values")
    iv = stats.t_interval(np.log(x))
    return {**iv, **{k: math.exp(iv[k]) for k in ("mean", "lo", "hi")}}


def paired(runs: dict, method: str, against: str, column: str, lr: float, kind: str, regime: str = "") \
        -> Contrast | None:
    """``method`` against ``against`` on ``column`` at ``lr``, paired by seed (None below :data:`MIN_SEEDS`)."""
    seeds = sorted(s for m, ll, s in runs if m == method and ll == lr and (against, lr, s) in runs
                   and column in runs[(m, ll, s)] and column in runs[(against, lr, s)])
    if len(seeds) < MIN_SEEDS:
        return None
    a = np.array([runs[(method, lr, s)][column] for s in seeds])
    b = np.array([runs[(against, lr, s)][column] for s in seeds])
    if kind == "ratio":
        d, iv = np.log(a / b), geometric_interval(a / b)
    else:
        d = a - b
        iv = stats.t_interval(d)
    return Contrast(regime, lr, method, against, column, kind, iv, stats.paired_t_p(d))


def per_rate(results: dict, methods=("proma", "proma-paper"), regimes=("learn-240", "collapse")) -> list[Contrast]:
    """Every method of ``methods`` against GRPO at each learning rate, on each of :data:`PER_RATE_COLUMNS`."""
    out = []
    for regime in regimes:
        runs = results.get(regime, {})
        for lr in sorted({ll for _, ll, _ in runs}):
            for m in methods:
                for column, kind, _ in PER_RATE_COLUMNS:
                    c = paired(runs, m, BASELINE, column, lr, kind, regime)
                    if c is not None:
                        out.append(c)
    return out


def minibatch_contrasts(results: dict) -> list[Contrast]:
    """One minibatch (``<regime>-mb1``): exact PROMA and the published settings against GRPO in both KLs. Two
    minibatches at 1x: the same on minibatch 0 and minibatch 1 separately (``local_kl_mb<k>``, ``oos_kl_mb<k>``)."""
    out = []
    for regime, lr in ONE_X.items():
        for name, columns in ((f"{regime}-mb1", ("oos_kl_mean", "local_kl_mean")),
                              (regime, ("local_kl_mb0", "local_kl_mb1", "oos_kl_mb0", "oos_kl_mb1"))):
            runs = results.get(name, {})
            for m in ("proma", "proma-paper"):
                for column in columns:
                    c = paired(runs, m, BASELINE, column, lr, "ratio", name)
                    if c is not None:
                        out.append(c)
    return out


def code_contrasts(results: dict, regimes=tuple(ONE_X)) -> list[Contrast]:
    """``proma-code`` against ``proma-paper`` at 1x: reward gain (difference) and in-sample local KL (ratio)."""
    out = []
    for regime in regimes:
        runs = results.get(regime, {})
        lr = ONE_X.get(regime) or next(iter(sorted({ll for _, ll, _ in runs})), None)
        for column, kind in (("reward_gain", "difference"), ("local_kl_mean", "ratio")):
            c = paired(runs, "proma-code", "proma-paper", column, lr, kind, regime)
            if c is not None:
                out.append(c)
    return out


def x_summary(runs: dict, seeds=None) -> list[dict]:
    """Per method in X: ``{"method", "n", "entropy", "rule", "oos_kl", "local_kl", "reward_gain"}``: t-intervals
    over seeds (the KLs' geometric, :func:`geometric_interval`); ``rule`` is the first study's absolute entropy
    label (:func:`verification.studies.claims.absolute_entropy`).

    ``seeds``: the study's seeds of X (the pilot's GRPO runs share X's folder and enter nothing); None: all."""
    if seeds is not None:
        runs = {k: v for k, v in runs.items() if k[2] in set(seeds)}
    out = []
    for m in sorted({m for m, _, _ in runs}):
        vals = [v for (mm, _, _), v in sorted(runs.items()) if mm == m]
        if len(vals) < MIN_SEEDS:
            continue
        entropy, rule = claims.absolute_entropy(runs, m)
        row = {"method": m, "n": len(vals), "entropy": entropy, "rule": rule,
               "reward_gain": stats.t_interval([v["reward_gain"] for v in vals])}
        for key, column in (("oos_kl", "oos_kl_mean"), ("local_kl", "local_kl_mean")):
            if all(column in v for v in vals):
                row[key] = geometric_interval([v[column] for v in vals])
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------- reproduction check
def _distance(x: float, y: float) -> float:
    """|x - y|, 0 for two NaNs (the same record), inf for one NaN (a difference no tolerance covers)."""
    if math.isnan(x) or math.isnan(y):
        return 0.0 if math.isnan(x) and math.isnan(y) else math.inf
    return abs(x - y)


def record_difference(new: dict, old: dict) -> tuple[float, str]:
    """Largest |new - old| over the numeric training fields both runs' records share, record by record, and the
    field where it occurs; wall times and the out-of-sample probe (:data:`NOT_TRAINING`) are not training.

    Raises ValueError when the runs have different record counts (then they did not train the same steps)."""
    a, b = new["metrics"], old["metrics"]
    if len(a) != len(b):
        raise ValueError(f"records: {len(a)} in the new run, {len(b)} in the old one")
    worst, where = 0.0, "-"
    for ra, rb in zip(a, b):
        for key in ra.keys() & rb.keys():
            if key.startswith(NOT_TRAINING) or not isinstance(ra[key], (int, float)):
                continue
            diff = _distance(float(ra[key]), float(rb[key]))
            if diff > worst:
                worst, where = diff, key
    return worst, where


def reproduction(study2_dir, first_dir, seeds=REPRODUCTION_SEEDS) -> list[dict]:
    """Per regime of :data:`ONE_X` with GRPO's 1x runs of ``seeds`` in both studies: ``{"regime", "seeds",
    "max_diff", "field", "val_diff"}`` (``val_diff``: largest |final accuracy difference|)."""
    out = []
    for regime, lr in ONE_X.items():
        pairs = [(tables.result_path(study2_dir, regime, BASELINE, lr, s),
                  tables.result_path(first_dir, regime, BASELINE, lr, s)) for s in seeds]
        pairs = [(s, a, b) for s, (a, b) in zip(seeds, pairs) if a.is_file() and b.is_file()]
        if not pairs:
            continue
        worst, field, val = 0.0, "-", 0.0
        for _, a, b in pairs:
            new, old = json.loads(Path(a).read_text()), json.loads(Path(b).read_text())
            diff, where = record_difference(new, old)
            if diff >= worst:
                worst, field = diff, where
            val = max(val, abs(new["final_eval"]["accuracy"] - old["final_eval"]["accuracy"]))
        out.append({"regime": regime, "seeds": [s for s, _, _ in pairs], "max_diff": worst, "field": field,
                    "val_diff": val})
    return out


# ---------------------------------------------------------------------------------------------- curves
def rollout_curves(data_dir, regime: str, keys=("entropy", "reward")) -> dict:
    """``{(method, lr, seed): {key: (S,) per rollout step}}`` of ``regime``'s runs; the entropy is divided by the
    run's first rollout step's (the end/start scale of ``entropy_end_ratio``)."""
    out = {}
    for path in sorted((Path(data_dir) / regime).glob("*-lr*-s*.json")):
        res = json.loads(path.read_text())
        c = res["config"]
        steps = tables.rollout_records(res["metrics"])
        curves = {k: np.array([float(r[k]) for r in steps]) for k in keys}
        if "entropy" in curves:
            curves["entropy"] = curves["entropy"] / curves["entropy"][0]
        out[(c["method"], c["lr"], c["seed"])] = curves
    return out


def seed_band(curves: list) -> dict:
    """Mean over seeds and the pointwise 95% t-interval of equally long curves: ``{"mean", "lo", "hi"}`` (S,)."""
    a = np.asarray(curves, dtype=float)
    if a.ndim != 2 or a.shape[0] < MIN_SEEDS:
        raise ValueError(f"curves: need at least {MIN_SEEDS} equally long curves, got shape {a.shape}")
    mean = a.mean(axis=0)
    half = stats.t_half_widths(a)
    return {"mean": mean, "lo": mean - half, "hi": mean + half}


def x_conditions(runs: dict, seeds=None) -> list[tuple[str, str, str]]:
    """GRPO's regime conditions in X by the first study's rules (:mod:`verification.studies.claims`):
    ``[(condition, evidence, "met" | "not met" | "inconclusive")]`` over ``seeds`` (None: all)."""
    if seeds is not None:
        runs = {k: v for k, v in runs.items() if k[2] in set(seeds)}
    lr = next(iter(sorted({ll for m, ll, _ in runs if m == BASELINE})), None)
    if lr is None:
        return []
    return [(claims.CONDITION_NAMES[key], *check(runs, lr)) for key, check in
            (("learns", claims.check_learns), ("heldout", claims.check_heldout),
             ("collapses", claims.check_collapses))]
