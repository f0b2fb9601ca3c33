"""The seed study's tables: per-run numbers from a result JSON, intervals over seeds, paired comparisons.

Input: the result files of :mod:`verification.studies.seeds` (``data_dir/<regime>/<method>-lr<lr>-s<seed>.json``).
Interval formulas are in :mod:`verification.studies.stats`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import stats

BASELINE = "grpo"


# Fraction of rollout steps averaged at each end of a run for the reward gain (last quarter minus first).
GAIN_FRACTION = 0.25


# Fewest rollout steps over which a reward gain is taken at equal KL (a quarter of them is one step).
MIN_EQUAL_KL_STEPS = 4


def thirds(x: np.ndarray) -> list[np.ndarray]:
    """``x`` (n,) cut into first, middle and last third: x[floor(k n / 3) : floor((k + 1) n / 3)], each at least one
    element long (with n < 3 a third repeats its neighbour's element)."""
    n = x.size
    if n == 0:
        raise ValueError("thirds: empty array")
    cuts = [k * n // 3 for k in range(4)]
    return [x[min(a, n - 1):max(b, min(a, n - 1) + 1)] for a, b in zip(cuts[:-1], cuts[1:])]


def rollout_records(recs: list) -> list:
    """The first record of each rollout step, in step order: it holds the step's rollout numbers (reward, entropy),
    which every minibatch's record of that step repeats."""
    per_step = {}
    for r in recs:
        per_step.setdefault(r["step"], r)
    return [per_step[k] for k in sorted(per_step)]


def run_numbers(result: dict, start_eval: dict | None = None) -> dict:
    """Per-run scalars of one result JSON (definitions in :data:`COLUMNS`)."""
    recs = result["metrics"]
    steps = rollout_records(recs)
    q = max(1, int(round(GAIN_FRACTION * len(steps))))
    reward = np.array([r["reward"] for r in steps])
    entropy = np.array([r["entropy"] for r in steps])
    local_kl = np.array([r["local_kl"] for r in recs])
    out = {
        "reward_gain": float(reward[-q:].mean() - reward[:q].mean()),
        "local_kl_mean": float(local_kl.mean()),
        "local_kl_median": float(np.median(local_kl)),
        "local_kl_last_quarter": float(local_kl[-max(1, int(round(GAIN_FRACTION * local_kl.size))):].mean()),
        **{f"local_kl_third_{k + 1}": float(part.mean()) for k, part in enumerate(thirds(local_kl))},
        "local_kl_cum": float(local_kl.sum()),
        "entropy_start": float(entropy[0]),
        "entropy_min_ratio": float(entropy.min() / entropy[0]),
        "entropy_end_ratio": float(entropy[-q:].mean() / entropy[0]),
        "val_final": result["final_eval"]["accuracy"],
        "val_final_se": result["final_eval"]["se"],
    }
    if all("oos_local_kl" in r for r in recs):
        out["oos_kl_mean"] = float(np.mean([r["oos_local_kl"] for r in recs]))
    for k in sorted({r.get("minibatch", 0) for r in recs}):  # per minibatch: 0 is on-policy, later ones are not
        part = [r for r in recs if r.get("minibatch", 0) == k]
        out[f"local_kl_mb{k}"] = float(np.mean([r["local_kl"] for r in part]))
        if "oos_kl_mean" in out:
            out[f"oos_kl_mb{k}"] = float(np.mean([r["oos_local_kl"] for r in part]))
    if start_eval is not None:
        out["val_change"] = out["val_final"] - start_eval["accuracy"]
    return out


COLUMNS = {
    "reward_gain": "mean rollout reward over the last quarter of rollout steps minus over the first quarter",
    "local_kl_mean": "mean over optimizer steps of the exact local KL (per scored token, before || after step)",
    "local_kl_median": "median over optimizer steps of the exact local KL",
    "local_kl_last_quarter": "mean exact local KL over the last quarter of optimizer steps",
    "local_kl_third_1": "mean exact local KL over the first third of optimizer steps (_2, _3: the middle and last)",
    "local_kl_cum": "sum over optimizer steps of the exact local KL",
    "entropy_min_ratio": "lowest per-step token entropy of the rollouts divided by the first step's",
    "entropy_end_ratio": "token entropy over the last quarter of rollout steps divided by the first step's",
    "val_final": "greedy exact-match accuracy of the final policy on the scored test items (the whole test "
                 "split unless the grid's eval_items caps it)",
    "val_change": "val_final minus the warm-start's accuracy on the same split",
    "oos_kl_mean": "mean over optimizer steps of the out-of-sample local KL (fresh completions of held-out prompts "
                   "from the policy before each step; runs of the second study)",
    "local_kl_mb0": "mean local KL over the optimizer steps of minibatch 0 (on-policy); _mb1: of minibatch 1; "
                    "oos_kl_mb0, oos_kl_mb1: the same for the out-of-sample local KL",
}


def reward_kl_curve(result: dict) -> tuple[np.ndarray, np.ndarray]:
    """(rollout reward per rollout step, cumulative exact local KL at the end of each rollout step), both (S,)."""
    reward, kl = {}, {}
    for r in result["metrics"]:
        reward.setdefault(r["step"], r["reward"])
        kl[r["step"]] = kl.get(r["step"], 0.0) + r["local_kl"]
    steps = sorted(reward)
    return np.array([reward[k] for k in steps]), np.cumsum([kl[k] for k in steps])


def gain_within_kl(reward: np.ndarray, cum_kl: np.ndarray, budget: float) -> tuple[float, int]:
    """Reward gain of a run over the rollout steps that spend at most ``budget`` cumulative local KL.

    n = the first rollout step whose cumulative KL reaches ``budget`` (all S steps if none does; at least
    :data:`MIN_EQUAL_KL_STEPS`); gain = mean reward of the last quarter of those n steps minus the first quarter's.
    Returns (gain, n).
    """
    n = int(np.searchsorted(cum_kl, budget, side="left")) + 1
    n = min(len(reward), max(n, MIN_EQUAL_KL_STEPS))
    q = max(1, int(round(GAIN_FRACTION * n)))
    return float(reward[n - q:n].mean() - reward[:q].mean()), n


def load_curves(data_dir, regime: str) -> dict:
    """``{(method, lr, seed): (reward, cumulative local KL)}`` (:func:`reward_kl_curve`) of ``regime``'s runs."""
    out = {}
    for path in sorted((Path(data_dir) / regime).glob("*-lr*-s*.json")):
        res = json.loads(path.read_text())
        c = res["config"]
        out[(c["method"], c["lr"], c["seed"])] = reward_kl_curve(res)
    return out


def equal_kl(curves: dict, *, baseline: str = BASELINE, level: float = 0.95) -> dict:
    """Reward gain at equal cumulative local KL, each method against ``baseline``, paired by seed.

    Per seed k: budget K_k = the smaller of the two runs' final cumulative local KL; each run's gain is
    :func:`gain_within_kl` at K_k (the run that spends KL faster is cut earlier). Returns per (method, lr)
    ``{"budget", "gain", "gain_base", "diff", "steps", "steps_base"}``: t-intervals over seeds (``diff`` the
    paired difference method - baseline); methods with fewer than 2 paired seeds are left out.
    """
    out = {}
    for m, lr in sorted({(m, lr) for m, lr, _ in curves if m != baseline}):
        seeds = sorted(s for mm, ll, s in curves if (mm, ll) == (m, lr) and (baseline, lr, s) in curves)
        if len(seeds) < 2:
            continue
        rows = []
        for s in seeds:
            (ra, ka), (rb, kb) = curves[(m, lr, s)], curves[(baseline, lr, s)]
            budget = min(ka[-1], kb[-1])
            rows.append((budget, *gain_within_kl(ra, ka, budget), *gain_within_kl(rb, kb, budget)))
        budget, gain, steps, gain_b, steps_b = (np.array(c, dtype=float) for c in zip(*rows))
        out[(m, lr)] = {"budget": stats.t_interval(budget, level=level), "gain": stats.t_interval(gain, level=level),
                        "gain_base": stats.t_interval(gain_b, level=level),
                        "diff": stats.paired_difference_t(gain, gain_b, level=level),
                        "steps": float(steps.mean()), "steps_base": float(steps_b.mean())}
    return out


def markdown_equal_kl(table: dict, *, baseline: str = BASELINE) -> str:
    """:func:`equal_kl`'s table (markdown)."""
    f = stats.format_interval
    lines = [f"| method | lr | KL budget (cumulative local KL) | steps used (method / {baseline}) | reward gain | "
             f"{baseline} reward gain | difference (paired) |", "|---|---|---|---|---|---|---|"]
    for (m, lr), row in table.items():
        lines.append(f"| {m} | {lr:g} | {f(row['budget'], '.3g')} | {row['steps']:.0f} / {row['steps_base']:.0f} | "
                     f"{f(row['gain'])} | {f(row['gain_base'])} | {f(row['diff'], '+.3f')} |")
    return "\n".join(lines) + "\n"


def run_wall_seconds(result: dict) -> float:
    """Wall seconds the run of one result JSON costs from scratch (one single-threaded worker).

    ``seconds.total`` is the time of the process that finished the run; a run resumed from its checkpoint
    records only the steps it redid. The metric records time every step whatever the sitting: one record per
    minibatch with its own ``time/train``, ``time/metrics`` and ``time/probe`` (the out-of-sample KL's, when on), and the step's ``time/rollout`` repeated in each,
    so it is counted once per step. With the final evaluation (``total - train``)::

        max(total, sum_s rollout_s + sum_records (train + metrics) + total - train)

    (periodic evaluations inside a resumed part are not in these times, so a resumed run is slightly
    underestimated; for an uninterrupted run the sum is below ``train`` and ``total`` is returned).
    """
    sec, recs = result["seconds"], [r for r in result["metrics"] if "time/train" in r]
    rollout = {r["step"]: r["time/rollout"] for r in recs}
    timed = sum(rollout.values()) + sum(r["time/train"] + r["time/metrics"] + r.get("time/probe", 0.0) for r in recs)
    return float(max(sec["total"], timed + sec["total"] - sec["train"]))


def run_name(method: str, lr: float, seed: int) -> str:
    """A run's name, also its result file's stem: ``<method>-lr<lr>-s<seed>``."""
    return f"{method}-lr{lr:g}-s{seed}"


def result_path(data_dir, regime: str, method: str, lr: float, seed: int) -> Path:
    """A run's result JSON in the study's data folder."""
    return Path(data_dir) / regime / f"{run_name(method, lr, seed)}.json"


def start_eval_path(folder, warm_id: str | None) -> Path:
    """The whole-split evaluation of the warm-start ``warm_id`` in a regime's data folder.

    ``start_eval.json`` is the first study's warm-start (its runs predate warm-start ids); any other warm-start
    has ``start_eval-<id>.json``. A warm-start id of the first study's weights is never written (unknown).
    """
    return Path(folder) / ("start_eval.json" if warm_id is None else f"start_eval-{warm_id}.json")


def warmstart_evals(folder) -> list[dict]:
    """Every warm-start of a regime's data folder with its whole-split evaluation and the seeds that started from
    it: ``[{"file", "n", "accuracy", "se", "seeds"}]``, the first study's (``start_eval.json``) first.

    Raises ValueError when the folder has no warm-start evaluation (the regime's study has not started).
    """
    folder = Path(folder)
    files = sorted(folder.glob("start_eval*.json"), key=lambda p: (p.name != "start_eval.json", p.name))
    if not files:
        raise ValueError(f"{folder / 'start_eval.json'}: missing; the seed study of regime {folder.name!r} has not "
                         "started")
    seeds = {path.name: set() for path in files}
    for path in folder.glob("*-lr*-s*.json"):
        res = json.loads(path.read_text())
        seeds.setdefault(start_eval_path(folder, res.get("warmstart", {}).get("id")).name, set()).add(
            res["config"]["seed"])
    out = []
    for path in files:
        res = json.loads(path.read_text())
        out.append({"file": path.name, **{k: res[k] for k in ("n", "accuracy", "se")},
                    "seeds": sorted(seeds[path.name])})
    return out


def load_results(data_dir, regime: str) -> dict:
    """``{(method, lr, seed): run numbers}`` of every result file of ``regime``; a run's validation change is
    taken against the warm-start it started from (:func:`start_eval_path`)."""
    folder = Path(data_dir) / regime
    out = {}
    for path in sorted(folder.glob("*-lr*-s*.json")):
        res = json.loads(path.read_text())
        c = res["config"]
        start_path = start_eval_path(folder, res.get("warmstart", {}).get("id"))
        start = json.loads(start_path.read_text()) if start_path.exists() else None
        out[(c["method"], c["lr"], c["seed"])] = run_numbers(res, start)
    return out


def aggregate(runs: dict, *, baseline: str = BASELINE, level: float = 0.95) -> dict:
    """Per (method, lr): t-intervals over seeds of every column, and paired ratios / differences to ``baseline``.

    ``runs`` is :func:`load_results`'s dict. Ratios (local KL) use the log-ratio t-interval over seeds run by
    both methods (:func:`verification.studies.stats.paired_ratio_t`); differences (reward gain, validation) the paired
    t-interval of the per-seed differences.
    """
    table = {}
    keys = sorted({(m, lr) for m, lr, _ in runs})
    for m, lr in keys:
        seeds = sorted(s for mm, ll, s in runs if (mm, ll) == (m, lr))
        # a study in progress can have one seed of a method: its value, without an interval
        cols = {c: (stats.t_interval([runs[(m, lr, s)][c] for s in seeds], level=level) if len(seeds) > 1
                    else stats.single_value(runs[(m, lr, seeds[0])][c]))
                for c in runs[(m, lr, seeds[0])]}
        row = {"n_seeds": len(seeds), "columns": cols}
        base = [s for s in seeds if (baseline, lr, s) in runs]
        if m != baseline and len(base) >= 2:
            a = [runs[(m, lr, s)]["local_kl_mean"] for s in base]
            b = [runs[(baseline, lr, s)]["local_kl_mean"] for s in base]
            # a run with zero local KL (no non-zero advantage in any step) has no ratio
            row["ratio_local_kl"] = stats.paired_ratio_t(a, b, level=level) if min(a + b) > 0 else None
            for c in ("reward_gain", "val_final"):
                row[f"diff_{c}"] = stats.paired_difference_t(
                    [runs[(m, lr, s)][c] for s in base], [runs[(baseline, lr, s)][c] for s in base], level=level)
        table[(m, lr)] = row
    return table


def markdown_tables(table: dict) -> str:
    """Headline table, paired comparison to GRPO, and reward gain against cumulative local KL (markdown)."""
    f = stats.format_interval
    lines = ["| method | lr | seeds | reward gain | val final | val change | mean local KL | "
             "entropy min / start | entropy last quarter / start |", "|---|---|---|---|---|---|---|---|---|"]
    for (m, lr), row in table.items():
        c = row["columns"]
        change = f(c["val_change"], "+.3f") if "val_change" in c else "-"
        lines.append(f"| {m} | {lr:g} | {row['n_seeds']} | {f(c['reward_gain'])} | {f(c['val_final'])} | {change} | "
                     f"{f(c['local_kl_mean'], '.3g')} | {f(c['entropy_min_ratio'])} | {f(c['entropy_end_ratio'])} |")
    lines += ["", f"Paired by seed against {BASELINE} (same warm-start and prompts):", "",
              "| method | lr | local KL ratio | reward gain difference | val final difference |",
              "|---|---|---|---|---|"]
    for (m, lr), row in table.items():
        if "ratio_local_kl" in row:
            ratio = f(row["ratio_local_kl"]) if row["ratio_local_kl"] else "n/a (a run has zero local KL)"
            lines.append(f"| {m} | {lr:g} | {ratio} | {f(row['diff_reward_gain'])} | "
                         f"{f(row['diff_val_final'])} |")
    lines += ["", "Reward gain against cumulative local KL (compare methods at equal KL):", "",
              "| method | lr | cumulative local KL | reward gain | gain per unit cumulative KL |",
              "|---|---|---|---|---|"]
    for (m, lr), row in table.items():
        c = row["columns"]
        cum = c["local_kl_cum"]["mean"]
        per = f"{c['reward_gain']['mean'] / cum:.3g}" if cum > 0 else "n/a (zero local KL)"
        lines.append(f"| {m} | {lr:g} | {f(c['local_kl_cum'], '.3g')} | {f(c['reward_gain'])} | {per} |")
    lines += ["", "Intervals: 95% Student-t over seeds (ratios: t-interval of the per-seed log-ratio, "
              "exponentiated). Columns: " + "; ".join(f"{k}: {v}" for k, v in COLUMNS.items()) + "."]
    return "\n".join(lines) + "\n"


def markdown_validation_per_seed(runs: dict) -> str:
    """Final greedy validation of every run, one row per (method, lr) and one column per seed (markdown).

    ``runs`` is :func:`load_results`'s dict; each cell is ``accuracy ± se`` with the binomial standard error
    se = sqrt(p (1 - p) / n) over the n scored test items ("-" where that seed has not run).
    """
    seeds = sorted({s for _, _, s in runs})
    lines = ["| method | lr | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    for m, lr in sorted({(m, lr) for m, lr, _ in runs}):
        cells = [f"{runs[(m, lr, s)]['val_final']:.3f} ± {runs[(m, lr, s)]['val_final_se']:.3f}"
                 if (m, lr, s) in runs else "-" for s in seeds]
        lines.append(f"| {m} | {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
