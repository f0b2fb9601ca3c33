"""``proma-verify report``: train every method on GSM8K, measure, and write ``REPORT.md`` with PNGs and JSON.

Phases (each shows progress): 1. the oracle cases checked against the reference and the torch
implementation; 2. the grid of training runs (every method x learning rate, one shared warm-start);
3. the projection study on real microbatches of the runs (start and end policy); 4. the seed study (every
method over seeds in each regime, ``verification.report.seed_evidence``: intervals, the verdict table) and the
first-order check of the mechanism; 5. summaries, plots and the report text, generated from the measured
values (``verification.report.render``).

Modes: ``full`` (the default small configuration of the harness, the committed report), ``quick`` (a
reduced warm-start and few steps: a few minutes), ``smoke`` (the harness's smoke preset: seconds, for CI).
"""
from __future__ import annotations

import json
import math
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .render import render
from ..studies.grid import GridConfig, quiet_transformers, run_dir, run_grid

MODES = {
    # the committed report: harness defaults (small Qwen3, 3000-step warm-start), fewer rollout steps than a
    # training run so that 10 runs fit the time budget on 2 CPU cores
    "full": dict(grid=GridConfig(preset="small", steps=80, lrs=(1e-4, 3e-4), overrides=dict(eval_every=10)),
                 snapshots=("start", "end"), real_cases=True, intra_ranks=(1, 2, 4)),
    # README main command: same model, short warm-start, a few steps; intra at rank 1 only (the harness's
    # default), to stay within quick mode's time budget
    "quick": dict(grid=GridConfig(preset="small", steps=4, lrs=(1e-4, 3e-4),
                                  overrides=dict(warmstart_steps=300, eval_every=2, eval_size=64)),
                  snapshots=("end",), real_cases=True, intra_ranks=(1,)),
    # CI: the harness's smoke preset (its policy earns no reward: the projection study falls back to the
    # real-case policy)
    "smoke": dict(grid=GridConfig(preset="smoke", steps=2, lrs=(1e-3, 3e-3)),
                  snapshots=("end",), real_cases=True, intra_ranks=(1, 2)),
}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _write_text_atomic(path: Path, text: str) -> None:
    from proma.rl.rundir import write_atomic  # the harness's; imported here like every harness module

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)


def _write_json(path: Path, obj) -> Path:
    _write_text_atomic(path, json.dumps(_jsonable(obj), indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- phases
def oracle_phase(work_dir: Path, *, real: bool, seed: int, realcase_cache, log) -> dict:
    """Write the golden cases and check this project's implementations against them."""
    from ..oracle.cases import generator_info, synthetic_cases
    from ..oracle.check import check_callable
    from ..oracle.format import save_cases
    from ..oracle.impls import IMPLEMENTATIONS

    cases = synthetic_cases(seed)
    if real:
        from ..studies.realcase import real_cases

        cases += real_cases(seed=seed, cache_dir=realcase_cache, log=log)
    cases_dir = work_dir / "cases"
    save_cases(cases_dir, cases, generator=generator_info(seed))
    results = {}
    for impl in ("reference", "torch", "torch-float32"):
        res = check_callable(cases_dir, IMPLEMENTATIONS[impl], progress=True)
        results[impl] = [r.to_json() for r in res.results]
    return {"cases_dir": str(cases_dir), "n_cases": len(cases), "results": results}


def study_phase(grid: GridConfig, runs_dir: Path, snapshot: str, *, intra_ranks, realcase_cache, log) -> dict:
    """Projection study on real microbatches of the ``proma`` run at the first learning rate.

    ``start``: the warm-start policy on the run's first rollout steps; ``end``: the run's final checkpoint on
    rollouts after its last step (steps it never trained on).
    """
    import torch

    from proma.rl.build import build_run
    from proma.rl.losses import completion_logprobs

    from ..studies.realcase import pick_minibatch
    from ..studies.projection_error import projection_study

    cfg = grid.train_config("proma", grid.lrs[0], runs_dir)
    s = build_run(cfg, log=lambda *a, **k: None)
    start = 0
    if snapshot == "end":
        ckpt = torch.load(run_dir(runs_dir, "proma", grid.lrs[0]) / "ckpt.pt", map_location="cpu", weights_only=True)
        s.model.load_state_dict(ckpt["model"])
        start = grid.steps
    policy = "warm-start" if snapshot == "start" else f"proma lr={grid.lrs[0]:g} after {grid.steps} steps"
    try:
        step, batches, weights = pick_minibatch(s, start_step=start)
        model = s.model
    except RuntimeError as exc:
        # every group got equal rewards (a policy too weak for the task): study the real-case policy instead
        from ..studies.realcase import real_rollout

        log(f"projection study ({snapshot}): {exc}; using the real-case policy instead")
        rs, step, batches, weights = real_rollout(seed=grid.seed, cache_dir=realcase_cache)
        model = rs.model
        policy = (f"FALLBACK: the real-case policy of `verification.studies.realcase` (the runs' {snapshot} policy had no "
                  "rollout with a non-zero advantage)")
    log(f"projection study ({snapshot}): rollout step {step}, {len(batches)} microbatches")
    out = projection_study(model, completion_logprobs, batches, weights, intra_ranks=intra_ranks)
    out.update(snapshot=snapshot, rollout_step=step, policy=policy,
               nonzero_weights=[int(np.count_nonzero(w)) for w in weights])
    return out


def _data_files(out: Path, grid) -> list:
    """The raw JSON files under ``out/data``, relative to ``out``; the seed study's as one line per regime."""
    data = out / "data"
    files = sorted(str(p.relative_to(out)) for p in data.rglob("*.json") if "seeds" not in p.relative_to(data).parts)
    return files + [f"data/seeds/{regime}/ ({len(list((data / 'seeds' / regime).glob('*.json')))} JSON files)"
                    for regime in grid.regimes]


# --------------------------------------------------------------------------------------------- report
def generate_report(out, *, mode: str = "full", runs_dir=None, seed: int = 0, jobs: int | None = None,
                    steps: int | None = None, lrs=None, realcase_cache=None, log=print) -> Path:
    """Run everything for ``mode`` and write ``out/REPORT.md``; returns its path.

    ``runs_dir`` (default ``out/runs``, git-ignored) keeps the training runs, their checkpoints and the
    warm-start caches; ``realcase_cache`` (default ``runs_dir/cache-realcase``) the real-case policy's.
    """
    from . import seed_evidence

    if mode not in MODES:
        raise ValueError(f"mode must be one of {tuple(MODES)}; got {mode!r}")
    spec = MODES[mode]
    quiet_transformers()
    grid = _grid(spec, seed=seed, steps=steps, lrs=lrs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(runs_dir) if runs_dir else out / "runs"
    data = out / "data"
    realcase_cache = Path(realcase_cache) if realcase_cache else runs_dir / "cache-realcase"
    timings = {}

    with _timed(timings, "oracle"):
        log("1/5 oracle cases: reference and torch against the golden files")
        oracle = oracle_phase(runs_dir, real=spec["real_cases"], seed=seed, realcase_cache=realcase_cache, log=log)

    with _timed(timings, "training"):
        log(f"2/5 training {len(grid.methods)} methods x {len(grid.lrs)} learning rates, {grid.steps} steps each")
        dirs = run_grid(grid, runs_dir, jobs=jobs, log=log)

    with _timed(timings, "projection_study"):
        log("3/5 projection study on real microbatches")
        studies = {snap: study_phase(grid, runs_dir, snap, intra_ranks=spec["intra_ranks"],
                                     realcase_cache=realcase_cache, log=log) for snap in spec["snapshots"]}

    with _timed(timings, "seed_study"):
        log("4/5 seed study (resumable: data/seeds) and first-order check")
        seeds = seed_evidence.seeds_phase(mode, data / "seeds", runs_dir, jobs=jobs, log=log)
    with _timed(timings, "first_order"):
        first = seed_evidence.first_order_phase(mode, seed=seed, realcase_cache=realcase_cache, log=log)

    with _timed(timings, "report"):
        log("5/5 summaries, plots and REPORT.md")
        runs, summaries = _collect_runs(grid, dirs, data)
        cfg0 = json.loads((dirs[(grid.methods[0], grid.lrs[0])] / "config.json").read_text())
        figures = _figures(out, runs, summaries, studies, steps=grid.steps)

    command = (f"proma-verify report --out {out}" + ("" if mode == "full" else f" --{mode}")
               + (f" --steps {steps}" if steps else "") + (f" --lrs {','.join(f'{x:g}' for x in lrs)}" if lrs else ""))
    meta = {"mode": mode, "grid": asdict(grid), "harness_config": cfg0, "timings_s": timings,
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine()}, "command": command}
    for name, obj in {"oracle": oracle, **{f"projection_{snap}": st for snap, st in studies.items()},
                      "summaries": summaries, "meta": meta, "first_order": first}.items():
        _write_json(data / f"{name}.json", obj)
    return _write_text(out, meta=meta, oracle=oracle, studies=studies, summaries=summaries, figures=figures,
                       seeds=seeds, first=first, runs=runs)


@contextmanager
def _timed(timings: dict, name: str):
    """Store the wall seconds of the ``with`` block in ``timings[name]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - t


def _grid(spec: dict, *, seed: int, steps: int | None, lrs) -> GridConfig:
    """The mode's single-seed grid with the command line's seed, steps and learning rates applied."""
    grid = asdict(spec["grid"])
    grid.update(seed=seed, **({"steps": int(steps)} if steps else {}), **({"lrs": tuple(lrs)} if lrs else {}))
    if grid["steps"] < 1 or len(grid["lrs"]) < 1 or any(not lr > 0 for lr in grid["lrs"]):
        raise ValueError(f"steps must be >= 1 and learning rates > 0; got steps={grid['steps']}, lrs={grid['lrs']}")
    return GridConfig(**grid)


def _collect_runs(grid: GridConfig, dirs: dict, data: Path) -> tuple[list, list]:
    """Each grid run's records and summary; writes ``data/runs/<method>_lr<lr>.json`` as it goes."""
    from proma.rl.summary import read_jsonl, summarize_run

    runs, summaries = [], []
    for method in grid.methods:
        for lr in grid.lrs:
            d = dirs[(method, lr)]
            records, evals = read_jsonl(d / "metrics.jsonl"), read_jsonl(d / "eval.jsonl")
            runs.append({"method": method, "lr": lr, "records": records, "evals": evals})
            summaries.append(summarize_run(d))
            _write_json(data / "runs" / f"{method}_lr{lr:g}.json",
                        {"config": json.loads((d / "config.json").read_text()), "metrics": records, "eval": evals})
    return runs, summaries


def _figures(out: Path, runs: list, summaries: list, studies: dict, *, steps: int) -> dict:
    """Every PNG of the report, written to ``out``: ``{figure key: path}`` (``steps``: rollout steps per run)."""
    from . import plots

    figures = {
        "local_kl": plots.metric_curves(runs, "local_kl", out / "local_kl.png", ylabel="local KL (per token)", log=True),
        "kl_rollout": plots.metric_curves(runs, "kl", out / "kl_rollout.png", ylabel="KL to rollout policy", log=True),
        "second_order": plots.second_order_scatter(runs, out / "kl_second_order.png"),
        "kl_vs_gain": plots.kl_vs_gain(summaries, out / "kl_vs_gain.png"),
        "reward": plots.metric_curves(runs, "reward", out / "reward.png", ylabel="reward (rollout mean)",
                                      per_rollout_step=True, smooth=max(1, steps // 15)),
        "entropy": plots.metric_curves(runs, "entropy", out / "entropy.png", ylabel="token entropy (nats)",
                                       per_rollout_step=True),
        "val": plots.val_curves(runs, out / "val_accuracy.png"),
    }
    for snap, study in studies.items():
        figures[f"projection_{snap}"] = plots.projection_bars(study, out / f"projection_{snap}.png")
        figures[f"intra_{snap}"] = plots.intra_bars(study, out / f"intra_{snap}.png")
    return figures


def _write_text(out: Path, *, meta, oracle, studies, summaries, figures, seeds, first, runs) -> Path:
    from . import seed_evidence, seed_figures, study2_section

    figures = {**figures, **seed_figures.figures(seeds, out)}
    if seeds.get("study2"):
        figures = {**figures, **study2_section.figures(seeds["study2"], out)}

    text = render(meta=meta, oracle=oracle, studies=studies, summaries=summaries,
                  figures={k: p.name for k, p in figures.items()}, data_files=_data_files(out, seeds["grid"]),
                  seeds=seeds, first_order=first, kl_bounds=seed_evidence.kl_bounds(runs))
    path = out / "REPORT.md"
    _write_text_atomic(path, text)
    return path


def rerender_report(out, *, log=print) -> Path:
    """Rewrite ``out/REPORT.md`` and its figures from the measured values under ``out/data``; runs nothing.

    For a change of the reading or the tables after a report has run: every number comes from the JSON that
    :func:`generate_report` wrote (``meta``, ``oracle``, ``projection_<snapshot>``, ``summaries``,
    ``first_order``, ``runs/``, ``seeds/``), so the text matches what a full run would have written from them.
    """
    from . import seed_evidence

    out = Path(out)
    data = out / "data"

    def load(name: str):
        path = data / name
        if not path.is_file():
            raise ValueError(f"{path}: missing; --render-only needs the data/ of a report written by proma-verify report")
        return json.loads(path.read_text())

    meta = load("meta.json")
    mode, grid = meta["mode"], meta["grid"]
    if mode not in MODES:
        raise ValueError(f"{data / 'meta.json'}: mode must be one of {tuple(MODES)}; got {mode!r}")
    studies = {snap: load(f"projection_{snap}.json") for snap in MODES[mode]["snapshots"]}
    runs = []
    for method in grid["methods"]:
        for lr in grid["lrs"]:
            r = load(f"runs/{method}_lr{lr:g}.json")
            runs.append({"method": method, "lr": lr, "records": r["metrics"], "evals": r["eval"]})
    summaries = [_nan_for_none(s) for s in load("summaries.json")]
    log(f"re-rendering {out / 'REPORT.md'} from {data} (mode {mode})")
    seeds = seed_evidence.load_seeds(mode, data / "seeds")
    figures = _figures(out, runs, summaries, studies, steps=grid["steps"])
    return _write_text(out, meta=meta, oracle=load("oracle.json"), studies=studies, summaries=summaries,
                       figures=figures, seeds=seeds, first=load("first_order.json"), runs=runs)


def refresh_oracle(out, *, runs_dir=None, realcase_cache=None, log=print) -> Path:
    """Rerun only the oracle phase of a report already run, then re-render it (:func:`rerender_report`).

    For a change of the golden cases or of an implementation that the rest of the report does not depend on: the
    phase runs with the report's own mode and seed (``data/meta.json``), rewrites ``data/oracle.json`` and records
    the commit it ran in ``meta["refreshed"]["oracle"]``, which the report's oracle lines name.
    """
    from ..studies.provenance import code_version

    out = Path(out)
    meta_path = out / "data" / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"{meta_path}: missing; --refresh-oracle needs the data/ of a report written by proma-verify report")
    meta = json.loads(meta_path.read_text())
    if meta.get("mode") not in MODES:
        raise ValueError(f"{meta_path}: mode must be one of {tuple(MODES)}; got {meta.get('mode')!r}")
    runs_dir = Path(runs_dir) if runs_dir else out / "runs"
    realcase_cache = Path(realcase_cache) if realcase_cache else runs_dir / "cache-realcase"
    oracle = oracle_phase(runs_dir, real=MODES[meta["mode"]]["real_cases"], seed=meta["grid"]["seed"],
                          realcase_cache=realcase_cache, log=log)
    version = code_version()
    meta.setdefault("refreshed", {})["oracle"] = (version["commit"] or "unknown")[:7] + (
        " (dirty)" if version["dirty"] else "")
    _write_json(out / "data" / "oracle.json", oracle)
    _write_json(meta_path, meta)
    return rerender_report(out, log=log)


def _nan_for_none(obj):
    """Undo :func:`_jsonable` for numbers: JSON holds a non-finite value as ``null``."""
    if isinstance(obj, dict):
        return {k: _nan_for_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_for_none(v) for v in obj]
    return math.nan if obj is None else obj
