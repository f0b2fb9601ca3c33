"""The oracle's two ``proma-verify`` commands, ``cases`` and ``check`` (:mod:`verification.cli` adds ``report``).

    proma-verify cases --out DIR [--seed 0] [--no-real] [--regenerate] [--cache DIR]
    proma-verify check --cases DIR --candidate FILE [--allow-missing] [--step] [--only ID ...] [--verbose]
                       [--json OUT] [--dtype float32] [--rtol R] [--atol A]
    proma-verify check --cases DIR --impl reference|torch|torch-float32 [--step]

Exit status of ``check``: 0 at least one array was checked and every checked array passes, 1 some checked
array fails (or nothing was checked), 2 malformed input (the message names the file, case and array).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

IMPL_NAMES = ("reference", "torch", "torch-float32")


def cmd_cases(args, make_real=None) -> int:
    """Write the default case set (shipped, cached or generated: :func:`verification.oracle.golden.default_cases`).

    ``make_real(seed, cache_dir) -> list of Case`` generates the real cases when they are not at hand.
    """
    from .format import load_cases
    from .golden import default_cases

    start = time.perf_counter()
    real = None if args.no_real or make_real is None else (lambda seed: make_real(seed, args.cache))
    try:
        path = default_cases(args.out, seed=args.seed, real=not args.no_real, regenerate=args.regenerate,
                             make_real=real)
    except OSError as exc:
        return _output_error("cases", args.out, exc)
    cases, _ = load_cases(args.out)
    size = sum((Path(args.out) / f"{c.id}.npz").stat().st_size for c in cases)
    print(f"wrote {len(cases)} cases ({size / 1e6:.1f} MB) and {path} in {time.perf_counter() - start:.1f} s")
    for case in cases:
        print(f"  {case.id:<28} {case.settings.label():<48} {case.n_microbatches} microbatches, "
              f"{len(case.layers)} layers")
    return 0


def cmd_check(args) -> int:
    """Judge a candidate file or one of this project's implementations; print the table (and golden notes)."""
    import sys

    from .check import check_callable, check_candidate
    from .format import load_cases
    from .golden import golden_notes

    if (args.candidate is None) == (args.impl is None):
        print("error: give exactly one of --candidate FILE or --impl NAME", file=sys.stderr)
        return 2
    opts = dict(only=args.only or None, dtype=args.dtype, rtol=args.rtol, atol=args.atol,
                allow_missing=args.allow_missing, step=args.step)
    if args.candidate is not None:
        result = check_candidate(args.cases, args.candidate, **opts)
    else:
        from .impls import IMPLEMENTATIONS, STEP_IMPLEMENTATIONS

        fn = (STEP_IMPLEMENTATIONS if args.step else IMPLEMENTATIONS)[args.impl]
        result = check_callable(args.cases, fn, progress=True, **opts)
    print(result.table(verbose=args.verbose))
    for line in golden_notes(load_cases(args.cases, only=args.only or None)[0]):
        print(line)
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
        except OSError as exc:
            return _output_error("check", args.json, exc)
    return result.exit_code


def _output_error(command: str, path, exc: OSError) -> int:
    """An output that cannot be written: exit status 2 with the path and the reason (no traceback)."""
    import sys

    where = exc.filename if exc.filename is not None else path
    print(f"proma-verify {command}: error: cannot write {where}: {exc.strerror or exc}", file=sys.stderr)
    return 2


def tolerance_arg(text: str) -> float:
    """``--rtol`` / ``--atol``: a finite number >= 0 (inf would pass anything, NaN or a negative one nothing)."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def add_cases_parser(sub):
    p = sub.add_parser("cases", help="write the golden oracle cases (NumPy reference) to a directory")
    p.add_argument("--out", required=True, type=Path, help="case directory to write (manifest.json + .npz)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic factors and the real microbatch (default 0: the shipped golden set)")
    p.add_argument("--no-real", action="store_true",
                   help="skip the cases captured from a real Qwen3-architecture GSM8K microbatch")
    p.add_argument("--regenerate", action="store_true",
                   help="generate the cases again (and refresh the cache under ~/.cache/proma, or $PROMA_CACHE_DIR) "
                        "instead of copying the shipped or cached set")
    p.add_argument("--cache", type=Path, default=None,
                   help="directory for the small policy's warm-start checkpoint when real cases are generated "
                        "(default: under the user's cache directory, kept between calls)")
    return p


def add_check_parser(sub):
    p = sub.add_parser("check", help="compare an implementation with the golden cases")
    p.add_argument("--cases", required=True, type=Path, help="case directory (manifest.json + .npz)")
    p.add_argument("--candidate", type=Path, help="candidate .npz (see verification/FORMAT.md)")
    p.add_argument("--impl", choices=IMPL_NAMES,
                   help="run one of this project's implementations instead of reading a candidate; one of "
                        + ", ".join(IMPL_NAMES))
    p.add_argument("--allow-missing", action="store_true",
                   help="skip (and count, per case) layers, microbatches and cases absent from the candidate "
                        "instead of reporting them as errors")
    p.add_argument("--step", action="store_true",
                   help="step mode: every microbatch starts from the stored G_in (with --impl: run so; with "
                        "--candidate: declares that the candidate was computed so; it does not recompute it)")
    p.add_argument("--only", action="append", metavar="ID", help="check only this case id (repeatable)")
    p.add_argument("--dtype", choices=("float64", "float32"),
                   help="tolerance class, one of float64, float32 (default: the outputs' own dtype)")
    p.add_argument("--rtol", type=tolerance_arg, help="override the manifest's rtol (relative to each array's scale)")
    p.add_argument("--atol", type=tolerance_arg, help="override the manifest's atol (used only where the scale is 0)")
    p.add_argument("--verbose", action="store_true",
                   help="also print one row per (case, microbatch, layer): rel err, abs err, scale, result")
    p.add_argument("--json", type=Path, help="also write the per-case and per-layer results as JSON (FORMAT.md)")
    p.set_defaults(fn=cmd_check)
    return p
