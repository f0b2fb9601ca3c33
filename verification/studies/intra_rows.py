"""Intra's token rows in float32: which rows of float32 output gradients the float64 reference counts as data.

Intra's subspaces are built from the token rows that carry gradient (:func:`reference.gradient_rows`: the largest
|D| entry of the row above ``o * eps64`` times D's largest). A float32 implementation sees rounded D: a row that is
zero in exact arithmetic comes out near eps32 of the largest entry, and real rows can be small. This measures, on
the study policy's real minibatches (the first study's warm-starts and configs, GRPO's loss weights), where the two
kinds of rows lie in float32, and what each candidate cut does to intra's projected gradient (rank 1, two-sided,
the reference on the float64 factors with the rows the cut keeps, against the reference's own rows).

The committed report's projection-study policy (the start policy of its grid's ``proma`` run, ``reports/data/meta.json``)
is one more case, so that the report's float32 intra deviation is traced on its own microbatches.

Command: ``python -m verification.studies.intra_rows [--out reports/intra_rows.md] [--cache-dir runs/cache]`` (a few
minutes on one core with the warm-starts cached; ``--cache-dir``: where they are, else each case trains its own).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import numpy as np

FIRST_STUDY_DIR = Path("reports/data/seeds")
REPORT_META = Path("reports/data/meta.json")
REPORT_CASE = "report grid, start policy"
CASES = (("learn-240", 1e-4), ("collapse", 3e-4))
SEEDS = (5, 6, 7)
EPS32, EPS64 = float(np.finfo(np.float32).eps), float(np.finfo(np.float64).eps)
# candidate cuts, relative to D's largest entry, as functions of the out-features o
CANDIDATES = {"0 (exact non-zero: the first study's intra runs)": lambda o: 0.0,
              "o eps32 (2026-12-07, one sitting)": lambda o: o * EPS32, "o eps64 (float64's rule on float32 data)":
              lambda o: o * EPS64, **{f"{c} eps32": (lambda c: lambda o: c * EPS32)(c) for c in (2, 4, 8, 16, 32)}}


def policies(data_dir=FIRST_STUDY_DIR, meta_path=REPORT_META, cache_dir=None):
    """``(case, seed, run parts)`` of each case: the first study's GRPO config of that seed, then the report grid's
    ``proma`` run at its first learning rate (its start policy; skipped when ``meta_path`` does not exist), built
    locally; ``cache_dir``: the warm-start cache (None: a fresh one per case)."""
    from dataclasses import replace

    from proma.rl.build import build_run
    from proma.rl.config import TrainConfig

    from .grid import GridConfig

    known = set(TrainConfig.__dataclass_fields__)
    quiet = dict(log=lambda *a, **k: None)
    for regime, lr in CASES:
        for seed in SEEDS:
            path = Path(data_dir) / regime / f"grpo-lr{lr:g}-s{seed}.json"
            config = json.loads(path.read_text())["config"]
            with tempfile.TemporaryDirectory() as tmp:
                over = dict(config, out=tmp, oos_kl_prompts=0, cache_dir=cache_dir)
                yield regime, seed, build_run(TrainConfig(**{k: v for k, v in over.items() if k in known}), **quiet)
    if Path(meta_path).is_file():
        grid = GridConfig(**json.loads(Path(meta_path).read_text())["grid"])
        with tempfile.TemporaryDirectory() as tmp:
            cfg = grid.train_config("proma", grid.lrs[0], tmp)
            yield REPORT_CASE, grid.seed, build_run(replace(cfg, cache_dir=cache_dir) if cache_dir else cfg, **quiet)


def linear_uses(parts):
    """Every nn.Linear use of a real minibatch: ``(X, D weighted, D float32 weighted, X float32)``, float64 arrays
    (the float32 ones hold the float32 model's values)."""
    from proma.rl.losses import completion_logprobs
    from verification.oracle.model_case import linear_factors

    from .realcase import pick_minibatch

    _, batches, weights = pick_minibatch(parts)
    m64, m32 = copy.deepcopy(parts.model).double().eval(), copy.deepcopy(parts.model).float().eval()
    p32 = dict(m32.named_parameters())
    for batch, w in zip(batches, weights):
        if not np.any(w):
            continue
        _, f64 = linear_factors(m64, completion_logprobs, batch, batch["attention_mask"])
        _, f32 = linear_factors(m32, completion_logprobs, batch, batch["attention_mask"])
        for name, p in m64.named_parameters():
            for (X, D, seq), (X32, D32, _) in zip(f64.get(id(p), []), f32.get(id(p32[name]), [])):
                wt = np.asarray(w, dtype=np.float64)[seq][:, None]
                yield (X, D * wt, (np.asarray(D32, np.float32) * wt.astype(np.float32)).astype(np.float64),
                       np.asarray(X32, np.float32).astype(np.float64))


def measure(data_dir=FIRST_STUDY_DIR, log=print, cache_dir=None) -> dict:
    """Row ratios and each candidate's effect: ``{"uses", "rounding_max", "real_min", "candidates": {name:
    {"lost", "kept_rounding", "worst"}}, "ours": {...}}, "cases": [{"case", "uses", "real_min", "lost", "worst",
    "factors"}]}`` (ratios in units of eps32; a case's "lost" and "worst": the float32 rule's,
    :func:`proma.intra.gradient_rows`; "factors": the largest change of intra's result from the float32 model's X and
    D against the float64 ones on the same rows, projected in float64: the factors' rounding, row selection apart)."""
    import torch

    import reference
    from proma.intra import gradient_rows

    out = {"uses": 0, "rounding_max": 0.0, "real_min": np.inf,
           "candidates": {k: {"lost": 0, "kept_rounding": 0, "worst": 0.0} for k in [*CANDIDATES, "ours"]}}
    out["cases"] = []
    for regime, seed, parts in policies(data_dir, cache_dir=cache_dir):
        case = {"case": f"{regime} seed {seed}", "uses": 0, "real_min": np.inf, "lost": 0, "worst": 0.0,
                "factors": 0.0}
        out["cases"].append(case)
        for X, D, D32, X32 in linear_uses(parts):
            out["uses"] += 1
            case["uses"] += 1
            ref_rows = reference.gradient_rows(D)
            r64, r32 = (np.abs(a).max(1) / max(np.abs(a).max(), 1e-300) for a in (D, D32))
            rounding = ~ref_rows & (r64 > 0)
            if rounding.any():
                out["rounding_max"] = max(out["rounding_max"], float(r32[rounding].max()) / EPS32)
            if ref_rows.any():
                case["real_min"] = min(case["real_min"], float(r32[ref_rows].min()) / EPS32)
                out["real_min"] = min(out["real_min"], case["real_min"])
            exact = reference.intra_project(D.T @ X, X, D, rank=1)
            # the float32 model's factors against the float64 ones on the same rows (the reference's rows that
            # float32 does not round to exact zero, which would drop them from either), the projection in float64:
            # what the model's float32 forward and backward change, row selection apart
            same = ref_rows & (r32 > 0)
            if same.any():
                a64, a32 = (reference.intra_project(D.T @ X, x[same], d[same], rank=1, row_rcond=0.0)
                            for x, d in ((X, D), (X32, D32)))
                case["factors"] = max(case["factors"], float(np.linalg.norm(a32 - a64) / np.linalg.norm(a64)))
            cuts = {k: r32 > cut(D.shape[1]) for k, cut in CANDIDATES.items()}
            cuts["ours"] = gradient_rows(torch.tensor(D32, dtype=torch.float32)).numpy()
            for k, rows in cuts.items():
                c = out["candidates"][k]
                c["lost"] += int((ref_rows & ~rows).sum())
                c["kept_rounding"] += int((~ref_rows & rows).sum())
                if (rows != ref_rows).any():
                    got = reference.intra_project(D.T @ X, X[rows], D[rows], rank=1, row_rcond=0.0)
                    change = float(np.linalg.norm(got - exact) / np.linalg.norm(exact))
                    c["worst"] = max(c["worst"], change)
                    if k == "ours":
                        case["worst"] = max(case["worst"], change)
            case["lost"] += int((ref_rows & ~cuts["ours"]).sum())
        log(f"{regime} seed {seed}: {out['uses']} uses so far")
    return out


def _closing(res: dict) -> str:
    if res["real_min"] <= res["rounding_max"]:
        return ("No cut separates the two kinds of rows: real rows come out of float32 as small as rounding rows or "
                "smaller (a row whose exact gradient is far below eps32 of the largest entry), and intra's activation "
                "subspace counts a kept row's activation in full however small its gradient, so such a row changes "
                "the result by far more than float32 rounding, whichever side of the cut it falls.")
    return (f"No cut is guaranteed: the gap between the two kinds of rows is a factor of "
            f"{res['real_min'] / max(res['rounding_max'], 1e-300):.3g} here, and intra's activation subspace counts a "
            "kept row's activation in full however small its gradient, so a row on the wrong side changes the result "
            "by far more than float32 rounding.")


def markdown(res: dict) -> str:
    from proma.intra import ROUNDED_ZERO_EPS

    per_case = "\n".join(f"| {c['case']} | {c['uses']} | {c['real_min']:.3g} | {c['lost']} | {c['worst']:.3g} | "
                          f"{c['factors']:.3g} |" for c in res.get("cases", []))
    if per_case:
        per_case = (f"Per case, under the float32 rule ({ROUNDED_ZERO_EPS} eps32): the smallest real row in float32 "
                    "(eps32), the real rows lost, and the largest change of intra's result; beside them the largest change from the "
                    "float32 model's X and D against the float64 ones on the same rows (the reference's rows less those "
                    "float32 rounds to exactly zero), the projection computed in float64 for both: the float32 model's "
                    "rounding of the factors, row selection apart.\n\n| case | uses | "
                    "smallest real row (eps32) | real rows lost | largest change of intra's result | float32 model's factors, "
                    "same rows (projection in float64) |\n|---|---|---|---|---|---|\n"
                    + per_case + "\n\n")
    rows = "\n".join(f"| {k if k != 'ours' else f'proma (float32: {ROUNDED_ZERO_EPS} eps32)'} | {v['lost']} | "
                     f"{v['kept_rounding']} | {v['worst']:.3g} |" for k, v in res["candidates"].items())
    return f"""# Intra's token rows in float32

Generated by `python -m verification.studies.intra_rows` (module docstring: what and how). {res['uses']} `nn.Linear`
uses of real minibatches of the study policy (learn-240 and collapse warm-starts, seeds {', '.join(map(str, SEEDS))},
GRPO's configs) and of the report's projection-study policy ("{REPORT_CASE}", its `proma` run's config); output
gradients weighted by the run's loss weights.

- Rows that are zero in exact arithmetic (the float64 reference drops them; nonzero only by rounding) reach
  **{res['rounding_max']:.3g} eps32** of the largest entry in float32.
- Rows the float64 reference keeps go down to **{res['real_min']:.3g} eps32** in float32.

Each cut applied to the float32 rows, against the reference's own rows: real rows lost, rounding rows kept, and the
largest relative change of intra's projected gradient (rank 1, two-sided) that the difference causes.

| cut (relative to the largest entry) | real rows lost | rounding rows kept | largest change of intra's result |
|---|---|---|---|
{rows}

{per_case}{_closing(res)}
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m verification.studies.intra_rows", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="reports/intra_rows.md")
    ap.add_argument("--data-dir", default=str(FIRST_STUDY_DIR))
    ap.add_argument("--cache-dir", default=None, help="warm-start cache shared by the cases (default: one per case)")
    ns = ap.parse_args(argv)
    text = markdown(measure(ns.data_dir, cache_dir=ns.cache_dir))
    Path(ns.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
