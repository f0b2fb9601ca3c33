"""The first study's pictures: a forest plot of its eleven verdicts and seed-averaged curves with 95% bands (the
second study draws its 1x curves with the same functions, out-of-sample KL in place of the in-sample one).

Both are drawn from the seed study's data (``<report>/data/seeds``), never from one seed's trace. Curves: per regime
of the family and per method, the mean over seeds at each step with the pointwise 95% t-interval
(:func:`verification.studies.secondary2.seed_band`); the local KL is averaged on the log scale (a geometric mean,
as the KL hypotheses compare it). Each run's curve is a trailing moving average before the seed average
(:func:`verification.report.plots._smooth`, the first value standing in before the start): over
:data:`KL_SMOOTH` optimizer steps (KL) and :data:`ROLLOUT_SMOOTH` of its rollout steps (entropy, reward).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..studies import preregistered as P
from ..studies import tables
from ..studies.secondary2 import MIN_SEEDS, seed_band
from .plots import _smooth

FIGURES = {"forest": "seeds_forest.png", "curves": "seeds_curves.png"}
REGIMES = ("learn-240", "collapse", P.DEFAULT_VALIDATION_REGIME)
METHODS = ("grpo", "reinforce", "proma", "proma-paper", "intra")
KL_SMOOTH = 10          # optimizer steps in the moving average of a run's local KL before the seed average
ROLLOUT_SMOOTH = 1 / 30  # rollout-step window of entropy and reward, as a fraction of the run's rollout steps
KL_FLOOR = 1e-12        # a zero local KL (no update) drawn at this value on the log scale


def run_curves(result: dict, kl_key: str = "local_kl") -> dict:
    """One run's ``{kl_key: (opt steps,) smoothed log KL, "entropy": (S,) / first step's, "reward": (S,)}``.

    ``kl_key``: the per-optimizer-step KL record drawn (``local_kl`` in sample, ``oos_local_kl`` out of sample)."""
    recs = result["metrics"]
    steps = tables.rollout_records(recs)
    entropy = np.array([r["entropy"] for r in steps], dtype=float)
    kl = np.log(np.maximum([r[kl_key] for r in recs], KL_FLOOR))
    k = max(1, int(round(ROLLOUT_SMOOTH * len(steps))))
    return {kl_key: _smooth(kl, KL_SMOOTH), "entropy": _smooth(entropy / entropy[0], k),
            "reward": _smooth(np.array([r["reward"] for r in steps], dtype=float), k)}


def load_curves(data_dir, regimes=REGIMES, *, kl_key: str = "local_kl", lrs: dict | None = None) -> dict:
    """``{regime: {method: [run curves, one per seed]}}`` of the result files under ``data_dir/<regime>``.

    ``lrs``: ``{regime: learning rate}`` to keep one rate's runs of a regime that has several (None: all runs)."""
    out = {}
    for regime in regimes:
        for path in sorted((Path(data_dir) / regime).glob("*-lr*-s*.json")):
            res = json.loads(path.read_text())
            if lrs is not None and regime in lrs and res["config"]["lr"] != lrs[regime]:
                continue
            out.setdefault(regime, {}).setdefault(res["config"]["method"], []).append(run_curves(res, kl_key))
    return out


CURVES_TITLE = ("First study: mean over seeds with pointwise 95% t-bands (number of seeds in the legend); each run "
                "smoothed by a trailing moving average first")


def curves_plot(curves: dict, path, *, regimes=REGIMES, methods=METHODS, kl_key: str = "local_kl",
                kl_label: str = "local KL per token (geometric mean)", title: str = CURVES_TITLE) -> Path:
    """Rows: regimes; columns: the KL ``kl_key`` (geometric mean, log axis), entropy end/start, reward."""
    from .plots import _color, _save, plt

    regimes = [r for r in regimes if r in curves]
    fig, axes = plt.subplots(max(len(regimes), 1), 3, figsize=(15, 3.4 * max(len(regimes), 1)), squeeze=False)
    for row, regime in zip(axes, regimes):
        for ax, key, label in zip(row, (kl_key, "entropy", "reward"),
                                  (kl_label, "entropy / first step's", "rollout reward")):
            for m in methods:
                runs = [c[key] for c in curves[regime].get(m, [])]
                if len(runs) < MIN_SEEDS or len({r.size for r in runs}) != 1:
                    continue
                band = seed_band(runs)
                mean, lo, hi = (np.exp(band[k]) if key == kl_key else band[k] for k in ("mean", "lo", "hi"))
                x = np.arange(1, mean.size + 1)
                ax.plot(x, mean, color=_color(m), lw=1.2, label=f"{m} ({len(runs)})")
                ax.fill_between(x, lo, hi, color=_color(m), alpha=0.18)
            if key == kl_key:
                ax.set_yscale("log")
            ax.set_xlabel("optimizer step" if key == kl_key else "rollout step")
            ax.set_title(f"{regime}: {label}", fontsize=9)
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def forest_plot(outcomes: list, path) -> Path:
    """Each hypothesis' estimate and unadjusted 95% interval, coloured by its verdict: KL ratios (log axis),
    entropy differences, VAL's binding difference."""
    from .plots import _save, forest_panel, plt

    panels = (("local KL ratio (method / comparison)", "kl", 1.0), ("entropy end/start, paired difference",
                                                                   "entropy", 0.0),
              ("validation accuracy, intra minus the binding method", "val", 0.0))
    colors = {P.SUPPORTED: "tab:green", P.CONTRADICTED: "tab:red"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), gridspec_kw={"width_ratios": [6, 4, 1.6]})
    for ax, (title, kind, ref) in zip(axes, panels):
        items = [(o.hypothesis.id, o.estimate["mean"], o.estimate["lo"], o.estimate["hi"],
                  colors.get(o.verdict, "tab:gray"))
                 for o in outcomes if o.hypothesis.kind == kind and o.estimate is not None]
        forest_panel(ax, items, ref=ref, log=kind == "kl", title=title)
    fig.suptitle("First study: estimates with unadjusted 95% t-intervals over 15 seeds (green supported, "
                 "red contradicted, grey inconclusive; Holm-adjusted verdicts)", fontsize=9)
    return _save(fig, path)


def figures(seeds: dict, out) -> dict:
    """Write both PNGs into ``out`` for a full seed study (``seeds``: :func:`verification.report.seed_evidence.
    load_seeds`); ``{}`` in other modes, whose grids are not the family's."""
    if seeds.get("data_dir") is None or not any(r in seeds.get("results", {}) for r in REGIMES):
        return {}
    out = Path(out)
    outcomes = P.decide(seeds["results"])
    return {"seeds_forest": forest_plot(outcomes, out / FIGURES["forest"]),
            "seeds_curves": curves_plot(load_curves(seeds["data_dir"]), out / FIGURES["curves"])}
