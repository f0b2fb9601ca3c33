"""The multi-seed study: a resumable grid of (regime, method, lr, seed) training runs, one JSON per run.

Every run of a regime starts from ONE shared warm-start (trained once, then passed to the runs as a local
checkpoint with ``model=``, so the seed changes only the RL prompts and samples: runs with the same seed are
paired across methods, they see the same prompts at every step). Each finished run is written as
``data_dir/<regime>/<method>-lr<lr>-s<seed>.json`` (config, metrics records, and the final policy's greedy
accuracy on the task's WHOLE test split, per item) and is skipped when that file exists, so an interrupted
study is resumed by rerunning it. Training directories (checkpoints) live under ``runs_dir`` and are not
committed. Runs execute in a process pool of ``jobs`` workers with one torch thread each.

Aggregation into tables (headline numbers with 95% intervals, ratios to GRPO paired by seed, reward gain
against cumulative local KL) is :mod:`verification.studies.tables`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .provenance import code_version, environment
from .tables import BASELINE, aggregate, load_results, markdown_tables, result_path, run_name, start_eval_path

METHODS = ("reinforce", "grpo", "proma", "proma-paper", "intra")
# Study processes are started one per core; more threads per process oversubscribes the cores.
RUN_THREADS = 1
# Settings of every run of the study (the harness's ``small`` preset otherwise): evaluation on the run's
# fixed subset only at the start and the end (the whole test split is scored once per run by this module).
# No second-order KL estimate: the study does not use it, and its forward-mode pass is a large part of a step.
RUN_DEFAULTS = dict(eval_size=64, progress=False, ckpt_every=50, second_order=False)
# Regimes (overrides of the ``small`` preset), chosen from the GRPO pilots of reports/PILOT.md (numbers there):
# "learn-240" = a weaker warm-start (1000 supervised steps) on the 1024-prompt pool at lr 1e-4 for 240 rollout
# steps: the pilots' one setting where GRPO's rollout reward rose while held-out accuracy held (from the default
# warm-start it did not learn and validation fell), run three times longer than the 80 steps of the first study
# (LEARN_80_GRID), whose GRPO reward gain did not clear 0; "collapse" = the default warm-start on a 64-prompt
# pool (each prompt revisited many times) at lr 3e-4, where GRPO's reward rose on the pool while its entropy and
# held-out accuracy fell.
LEARN = dict(train_pool=1024, warmstart_steps=1000)
# The validation regime (PREREGISTRATION.md amendment 3), found by the held-out pilot (PILOT.md section 7): the
# learn-240 warm-start, the whole train split as the prompt pool (train_pool=0), 480 rollout steps at lr 5e-5,
# where GRPO's greedy accuracy on the whole test split rose on every pilot seed.
VALIDATION_REGIME = "heldout-all-lr5e-5"
_ALL_POOL = dict(train_pool=0, warmstart_steps=1000)
REGIMES = {
    "learn-240": dict(LEARN, steps=240),
    "collapse": dict(train_pool=64, steps=60),
    VALIDATION_REGIME: dict(_ALL_POOL, steps=480),
}
REGIME_LRS = {"learn-240": (1e-4,), "collapse": (3e-4,), VALIDATION_REGIME: (5e-5,)}
# Seeds 0-4 ran first (REPORT.md of 2026-11-28); 5-14 after reports/PREREGISTRATION.md (issue 21).
SEEDS = tuple(range(15))
# Items scored by whole_split_eval: more than any task's test split, i.e. all of it (setup slices a shuffle).
WHOLE_SPLIT = 10**9


@dataclass(frozen=True)
class StudyGrid:
    """The planned grid: regimes (preset overrides), learning rates per regime, methods and seeds.

    ``eval_items``: test items scored at the end of each run (None = the whole test split; a cap only for
    the report's quick and smoke modes).
    """

    regimes: dict = field(default_factory=lambda: dict(REGIMES))
    lrs: dict = field(default_factory=lambda: dict(REGIME_LRS))
    methods: tuple = METHODS
    seeds: tuple = SEEDS
    preset: str = "small"
    eval_items: int | None = None

    def __post_init__(self):
        missing = set(self.regimes) - set(self.lrs)
        if missing:
            raise ValueError(f"lrs: no learning rates for regime(s) {sorted(missing)}")
        if self.eval_items is not None and self.eval_items < 1:
            raise ValueError(f"eval_items must be >= 1 or None (whole split); got {self.eval_items}")

    def runs(self) -> list[tuple]:
        """Every (regime, method, lr, seed), seeds outermost so that a partial study has whole seeds."""
        return [(r, m, lr, s) for s in self.seeds for r in self.regimes for lr in self.lrs[r] for m in self.methods]


def warmstart_config(grid: StudyGrid, regime: str, cache_dir):
    """The harness config whose warm-start every run of ``regime`` shares (seed 0's).

    ``RUN_THREADS`` threads like every run: a warm-start left to torch's default thread count beside another
    study process oversubscribes the cores.
    """
    from proma.rl.config import TrainConfig

    over = {k: v for k, v in grid.regimes[regime].items() if k != "steps"}
    return TrainConfig.from_preset(grid.preset, **{**over, "seed": 0, "cache_dir": str(cache_dir),
                                                   "out": str(Path(cache_dir) / "warmstart-setup"),
                                                   "progress": False, "num_threads": RUN_THREADS})


def ensure_warmstart(grid: StudyGrid, regime: str, cache_dir, *, log=print) -> Path:
    """Train (or load from ``cache_dir``) the regime's warm-start; returns its checkpoint directory."""
    from proma.rl.build import build_run

    s = build_run(warmstart_config(grid, regime, cache_dir), log=log)
    if s.warmstart_dir is None:
        raise ValueError(f"regime {regime!r}: its config has no warm-start (warmstart_steps=0 or model set)")
    return Path(s.warmstart_dir)


def run_config(grid: StudyGrid, regime: str, method: str, lr: float, seed: int, *, warm_dir, runs_dir) -> dict:
    from proma.rl.config import TrainConfig

    over = dict(grid.regimes[regime])
    steps = over.pop("steps")
    cfg = TrainConfig.from_preset(grid.preset, **{
        **RUN_DEFAULTS, **over, "method": method, "lr": lr, "seed": seed, "steps": steps, "eval_every": steps,
        "model": str(warm_dir), "out": str(Path(runs_dir) / regime / run_name(method, lr, seed)),
        "num_threads": RUN_THREADS})
    return cfg.to_dict()


def greedy_hits(s, batch_size: int = 256) -> np.ndarray:
    """(n_test,) 0/1 greedy exact-match of ``s.model`` on every item of ``s.eval_examples``.

    Per item (the harness's ``evaluate`` with ``per_item=True``) so that the study can pair items between
    policies.
    """
    from proma.rl.evaluation import evaluate

    return evaluate(s, batch_size, per_item=True)[1]


def whole_split_eval(cfg_dict: dict, state_dict=None, *, items: int | None = None) -> dict:
    """Greedy accuracy of a run's policy (``state_dict``; None = the warm-start) on the whole test split.

    ``items`` caps the number of test items (None = all of them).
    """
    import torch

    from proma.rl.config import TrainConfig
    from proma.rl.build import build_run

    cfg = TrainConfig(**{**cfg_dict, "eval_size": items or WHOLE_SPLIT})
    s = build_run(cfg, log=lambda *a, **k: None)
    if state_dict is not None:
        s.model.load_state_dict(state_dict)
    with torch.no_grad():
        hits = greedy_hits(s)
    acc = float(hits.mean())
    return {"n": int(hits.size), "accuracy": acc, "se": float(np.sqrt(acc * (1 - acc) / hits.size)),
            "hits": "".join(map(str, hits.tolist()))}


def _read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_one(cfg_dict: dict, out_json: str, eval_items: int | None = None) -> str:
    """Train one run (resuming its directory), score its final policy on the whole test split, write JSON.

    The JSON records the code it ran (:func:`code_version`, taken before training starts), the machine and
    libraries (:func:`environment`) and the warm-start it started from (:func:`warmstart_provenance`).
    """
    import torch

    from proma.rl import run
    from proma.rl.config import TrainConfig

    from .grid import quiet_transformers

    quiet_transformers()
    torch.set_num_threads(max(1, cfg_dict.get("num_threads") or 1))
    code, warm = code_version(), warmstart_provenance(cfg_dict["model"])
    t0 = time.perf_counter()
    run_dir = run(TrainConfig(**cfg_dict), log=lambda *a, **k: None)
    t_train = time.perf_counter() - t0
    ck = torch.load(Path(run_dir) / "ckpt.pt", map_location="cpu", weights_only=True)
    final = whole_split_eval(cfg_dict, ck["model"], items=eval_items)
    out = {"config": cfg_dict, "metrics": _read_jsonl(Path(run_dir) / "metrics.jsonl"),
           "eval": _read_jsonl(Path(run_dir) / "eval.jsonl"), "final_eval": final, "code": code,
           "environment": environment(), "warmstart": warm,
           "seconds": {"train": t_train, "total": time.perf_counter() - t0}}
    path = Path(out_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(out) + "\n")
    os.replace(tmp, path)
    return str(path)


def record_warmstart(warm_dir, folder) -> None:
    """Copy the warm-start's record (``warmstart.json``: key, steps, training seconds) into the regime's data folder.

    The report states a resumed study's cost from scratch with it; a warm-start without a record is skipped
    (nothing to copy), an existing copy is kept.
    """
    src, dst = Path(warm_dir) / "warmstart.json", Path(folder) / "warmstart.json"
    if src.is_file() and not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(src.read_text())


WARMSTART_ID_CHARS = 16


def warmstart_id(warm_dir) -> str:
    """Content hash of a warm-start's weights (first :data:`WARMSTART_ID_CHARS` hex digits of the SHA-256 of
    ``model.safetensors``): the same configuration trained on another machine can give other weights, and the
    runs of a study must say which ones they started from."""
    import hashlib

    return hashlib.sha256((Path(warm_dir) / "model.safetensors").read_bytes()).hexdigest()[:WARMSTART_ID_CHARS]


def warmstart_provenance(warm_dir) -> dict:
    """``{"id", **warmstart.json}`` of the warm-start a run starts from (recorded in every result JSON)."""
    record = Path(warm_dir) / "warmstart.json"
    return {"id": warmstart_id(warm_dir), **(json.loads(record.read_text()) if record.is_file() else {})}


def sync_warmstart_archive(cache, archive) -> None:
    """Make the committed warm-starts in ``archive`` and the ones in ``cache`` the same set (copy what is missing).

    A warm-start folder is ``warmstart-<config key>``; the archive (the repository's ``data/warmstarts``) makes a
    study resumed on another machine start from the same weights instead of retraining them.
    """
    import shutil

    cache, archive = Path(cache), Path(archive)
    for src_root, dst_root in ((archive, cache), (cache, archive)):
        for src in sorted(src_root.glob("warmstart-*")) if src_root.is_dir() else []:
            if (src / "warmstart.json").is_file() and not (dst_root / src.name).exists():
                shutil.copytree(src, dst_root / src.name)


def run_study(grid: StudyGrid, data_dir, runs_dir, *, jobs: int = 2, cache_dir=None, archive_dir=None,
              log=print) -> list[Path]:
    """Run every missing run of ``grid``; returns the result files written now (existing ones are kept).

    ``cache_dir`` (default ``runs_dir/cache``) holds the tokenizer and the warm-starts; ``archive_dir`` (None: no
    archive) the committed copies of the warm-starts (:func:`sync_warmstart_archive`). Each regime's
    warm-start is scored on the whole test split once (``start_eval-<warm-start id>.json``).
    """
    data_dir, runs_dir = Path(data_dir), Path(runs_dir)
    cache = Path(cache_dir) if cache_dir else runs_dir / "cache"
    todo = []
    for regime in grid.regimes:
        warm = prepare_regime(grid, regime, data_dir, runs_dir, cache, archive_dir, log=log)
        for key in grid.runs():
            if key[0] == regime and not result_path(data_dir, *key).exists():
                todo.append((run_config(grid, *key, warm_dir=warm, runs_dir=runs_dir), result_path(data_dir, *key)))
    log(f"study: {len(todo)} runs to do, {jobs} jobs")
    return run_all(todo, jobs=jobs, eval_items=grid.eval_items, log=log)


def prepare_regime(grid: StudyGrid, regime: str, data_dir, runs_dir, cache, archive_dir=None, *, reuse_from=None,
                   log=print) -> Path:
    """The warm-start of ``regime`` (trained, loaded or taken from the archive), its record in the regime's data
    folder, and its greedy accuracy on the whole test split (``start_eval-<warm-start id>.json``, once).

    ``reuse_from``: another regime folder whose score of the same weights (same warm-start id) is copied instead
    of scoring again.
    """
    if archive_dir:
        sync_warmstart_archive(cache, archive_dir)
    warm = ensure_warmstart(grid, regime, cache, log=log)
    if archive_dir:
        sync_warmstart_archive(cache, archive_dir)
    folder = Path(data_dir) / regime
    record_warmstart(warm, folder)
    first = run_config(grid, regime, grid.methods[0], grid.lrs[regime][0], 0, warm_dir=warm, runs_dir=runs_dir)
    start = start_eval_path(folder, warmstart_id(warm))
    earlier = start_eval_path(reuse_from, warmstart_id(warm)) if reuse_from is not None else None
    if not start.exists() and earlier is not None and earlier.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(earlier, start)
    if not start.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = start.with_name(start.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(whole_split_eval(first, items=grid.eval_items)) + "\n")
        os.replace(tmp, start)
    return warm


def run_all(todo: list, *, jobs: int, eval_items: int | None, log=print) -> list[Path]:
    """Run ``todo`` = [(config dict, result path)] in order; returns the result files written."""
    import multiprocessing as mp

    done = []
    if jobs <= 1:  # in this process: the code is imported once, so keep the checkout still while it runs
        for cfg, path in todo:
            done.append(Path(run_one(cfg, str(path), eval_items)))
            log(f"done {path}")
        return done
    # One fresh process per run: a run imports the code as it is when the run starts, so the commit it records
    # is the code it executed even when the checkout moves on while a long study is in flight.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        futures = [pool.submit(run_one, cfg, str(path), eval_items) for cfg, path in todo]
        for fut in as_completed(futures):
            done.append(Path(fut.result()))
            log(f"done {done[-1]}")
    return done


# ---------------------------------------------------------------------------------------------- command line
# The pilot (PILOT.md): GRPO only, 3 seeds, 40 rollout steps, to find the regimes the full grid uses.
PILOT_GRID = StudyGrid(regimes={"pilot-p64": dict(train_pool=64, steps=40)},
                       lrs={"pilot-p64": (3e-4, 1e-3)}, methods=("grpo",), seeds=(0, 1, 2))
# The first study's 80-step "learn" regime (PILOT.md sections 4-6; every method x 5 seeds, data committed): GRPO did
# not demonstrably learn in 80 steps, so the full grid runs the same regime for 240 steps instead.
LEARN_80_GRID = StudyGrid(regimes={"learn-80": dict(LEARN, steps=80)}, lrs={"learn-80": (1e-4,)})
# The held-out pilot (PILOT.md section 7): GRPO only, candidates tried in order, seeds 0-2 then 3-4; its third
# candidate was accepted and is the full grid's VALIDATION_REGIME.
HELDOUT_REGIMES = {
    "heldout-all-240": dict(_ALL_POOL, steps=240),
    "heldout-all-480": dict(_ALL_POOL, steps=480),
    VALIDATION_REGIME: REGIMES[VALIDATION_REGIME],
    "heldout-w500-all": dict(_ALL_POOL, warmstart_steps=500, steps=240),
    "heldout-h256-all": dict(_ALL_POOL, hidden_size=256, intermediate_size=683, steps=240),
}
HELDOUT_LRS = {**{r: (1e-4,) for r in HELDOUT_REGIMES}, VALIDATION_REGIME: REGIME_LRS[VALIDATION_REGIME]}
HELDOUT_GRID = StudyGrid(regimes=HELDOUT_REGIMES, lrs=HELDOUT_LRS, methods=("grpo",), seeds=(0, 1, 2, 3, 4))
GRIDS = {"full": StudyGrid(), "pilot": PILOT_GRID, "learn-80": LEARN_80_GRID, "heldout": HELDOUT_GRID}


def restrict(grid: StudyGrid, *, methods=None, seeds=None, regimes=None) -> StudyGrid:
    """``grid`` with only the given methods, seeds and regimes (None keeps all); unknown names are an error."""
    for name, asked, known in (("methods", methods, grid.methods), ("seeds", seeds, grid.seeds),
                               ("regimes", regimes, tuple(grid.regimes))):
        unknown = sorted(set(asked or ()) - set(known))
        if unknown:
            raise ValueError(f"--{name}: {unknown} not in the grid (it has {list(known)})")
    keep = [r for r in grid.regimes if regimes is None or r in regimes]
    return replace(grid, regimes={r: grid.regimes[r] for r in keep}, lrs={r: grid.lrs[r] for r in keep},
                   methods=tuple(m for m in grid.methods if methods is None or m in methods),
                   seeds=tuple(s for s in grid.seeds if seeds is None or s in seeds))


def main(argv=None) -> int:
    """``python -m verification.studies.seeds --grid pilot --data-dir D --runs-dir R [--jobs N]``: run, then tabulate."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default="full")
    ap.add_argument("--data-dir", default="reports/data/seeds")
    ap.add_argument("--runs-dir", default="runs/study")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--archive-dir", default="data/warmstarts", help="committed warm-starts ('' for none)")
    ap.add_argument("--methods", nargs="+", default=None, help="run only these methods of the grid")
    ap.add_argument("--seeds", nargs="+", type=int, default=None, help="run only these seeds of the grid")
    ap.add_argument("--regimes", nargs="+", default=None, help="run only these regimes of the grid")
    ap.add_argument("--plan", action="store_true", help="print what is left and its estimated cost; run nothing")
    ns = ap.parse_args(argv)
    grid = restrict(GRIDS[ns.grid], methods=ns.methods, seeds=ns.seeds, regimes=ns.regimes)
    if ns.plan:
        from .plan import markdown, plan
        print(markdown(plan(grid, ns.data_dir), workers=ns.jobs))
        return 0
    t0 = time.perf_counter()
    run_study(grid, ns.data_dir, ns.runs_dir, jobs=ns.jobs, cache_dir=ns.cache_dir, archive_dir=ns.archive_dir or None,
              log=lambda *a: print(f"[{time.perf_counter() - t0:7.0f}s]", *a, flush=True))
    for regime in grid.regimes:
        print(f"\n## {regime}\n")
        print(markdown_tables(aggregate(load_results(ns.data_dir, regime))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
