"""``proma-verify``: write golden cases, check an implementation against them, generate the report.

    proma-verify cases --out DIR [--seed 0] [--no-real]
    proma-verify check --cases DIR --candidate FILE [--allow-missing] [--step] [--only ID ...] [--verbose]
                       [--json OUT] [--dtype float32] [--rtol R] [--atol A]
    proma-verify check --cases DIR --impl reference|torch|torch-float32 [--step]
    proma-verify report --out reports/ [--quick | --smoke] [--steps N] [--lrs 1e-4,3e-4] [--jobs 2]

Exit status of ``check``: 0 at least one array was checked and every checked array passes, 1 some checked
array fails (or nothing was checked), 2 malformed input (the message names the file, case and array).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .format import FormatError

IMPL_NAMES = ("reference", "torch", "torch-float32")


def _cmd_cases(args) -> int:
    from .cases import generator_info, synthetic_cases
    from .format import save_cases

    cases = synthetic_cases(args.seed)
    if not args.no_real:
        from .realcase import real_cases

        cases += real_cases(seed=args.seed, cache_dir=args.cache)
    path = save_cases(args.out, cases, generator=generator_info(args.seed))
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.npz"))
    print(f"wrote {len(cases)} cases ({size / 1e6:.1f} MB) and {path}")
    for case in cases:
        print(f"  {case.id:<28} {case.settings.label():<48} {case.n_microbatches} microbatches, "
              f"{len(case.layers)} layers")
    return 0


def _cmd_check(args) -> int:
    from .check import check_callable, check_candidate

    if (args.candidate is None) == (args.impl is None):
        print("error: give exactly one of --candidate FILE or --impl NAME", file=sys.stderr)
        return 2
    only = args.only or None
    opts = dict(only=only, dtype=args.dtype, rtol=args.rtol, atol=args.atol, allow_missing=args.allow_missing,
                step=args.step)
    if args.candidate is not None:
        result = check_candidate(args.cases, args.candidate, **opts)
    else:
        from .impls import IMPLEMENTATIONS, STEP_IMPLEMENTATIONS

        fn = (STEP_IMPLEMENTATIONS if args.step else IMPLEMENTATIONS)[args.impl]
        result = check_callable(args.cases, fn, progress=True, **opts)
    print(result.table(verbose=args.verbose))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result.exit_code


def _cmd_report(args) -> int:
    from .report import generate_report, rerender_report

    if args.render_only:
        print(f"report written to {rerender_report(args.out)}")
        return 0
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    lrs = None
    if args.lrs:
        try:
            lrs = tuple(float(x) for x in args.lrs.split(","))
        except ValueError:
            print(f"error: --lrs must be comma-separated numbers; got {args.lrs!r}", file=sys.stderr)
            return 2
    path = generate_report(args.out, mode=mode, runs_dir=args.runs, seed=args.seed, jobs=args.jobs,
                           steps=args.steps, lrs=lrs)
    print(f"report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proma-verify", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("cases", help="write the golden oracle cases (NumPy reference) to a directory")
    p.add_argument("--out", required=True, type=Path, help="case directory to write (manifest.json + .npz)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic factors and the real microbatch (default 0)")
    p.add_argument("--no-real", action="store_true",
                   help="skip the cases captured from a real Qwen3-architecture GSM8K microbatch")
    p.add_argument("--cache", type=Path, default=None,
                   help="directory for the small policy's warm-start checkpoint (default: a temporary one)")
    p.set_defaults(fn=_cmd_cases)

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
                        "--candidate: the candidate was computed so)")
    p.add_argument("--only", action="append", metavar="ID", help="check only this case id (repeatable)")
    p.add_argument("--dtype", choices=("float64", "float32"),
                   help="tolerance class, one of float64, float32 (default: the outputs' own dtype)")
    p.add_argument("--rtol", type=float, help="override the manifest's rtol (relative to each array's scale)")
    p.add_argument("--atol", type=float, help="override the manifest's atol (used only where the scale is 0)")
    p.add_argument("--verbose", action="store_true",
                   help="also print one row per (case, microbatch, layer): rel err, abs err, scale, result")
    p.add_argument("--json", type=Path, help="also write the per-case and per-layer results as JSON (FORMAT.md)")
    p.set_defaults(fn=_cmd_check)

    p = sub.add_parser("report", help="run the small GSM8K configurations and write REPORT.md")
    p.add_argument("--out", required=True, type=Path, help="report directory (REPORT.md, PNGs, JSON)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="reduced runs (a few minutes); default: the full runs")
    mode.add_argument("--smoke", action="store_true", help="tiny runs for CI (seconds)")
    mode.add_argument("--render-only", action="store_true",
                      help="rewrite REPORT.md and its figures from OUT/data (a report already run); runs nothing")
    p.add_argument("--runs", type=Path, default=None, help="where training runs are kept (default OUT/runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (default 0)")
    p.add_argument("--steps", type=int, default=None, help="rollout steps per run (overrides the mode's)")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (overrides the mode's), e.g. 1e-4,3e-4")
    p.add_argument("--jobs", type=int, default=None, help="training runs in parallel (default: min(2, CPUs))")
    p.set_defaults(fn=_cmd_report)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
