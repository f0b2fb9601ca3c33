"""``proma-verify``: write golden cases, check an implementation against them, generate the report.

    proma-verify cases --out DIR [--seed 0] [--no-real] [--regenerate] [--cache DIR]
    proma-verify check --cases DIR --candidate FILE [--allow-missing] [--step] [--only ID ...] [--verbose]
                       [--json OUT] [--dtype float32] [--rtol R] [--atol A]
    proma-verify check --cases DIR --impl reference|torch|torch-float32 [--step]
    proma-verify report --out reports/ [--quick | --smoke] [--steps N] [--lrs 1e-4,3e-4] [--jobs 2]

Exit status of ``check``: 0 at least one array was checked and every checked array passes, 1 some checked
array fails (or nothing was checked), 2 malformed input (the message names the file, case and array).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from .oracle.cli import IMPL_NAMES, add_cases_parser, add_check_parser, cmd_cases  # noqa: F401
from .oracle.format import FormatError
from .oracle.verl_cli import add_verl_parser


# What the commands that train a policy need beyond the base install (NumPy/SciPy): the ``[rl]`` extra
RL_MODULES = ("torch", "transformers", "matplotlib")


def missing_modules(names=RL_MODULES) -> list:
    """The modules of ``names`` that are not installed."""
    return [name for name in names if importlib.util.find_spec(name) is None]


def _refuse_without_rl(what: str) -> None:
    """ValueError naming the ``[rl]`` extra when it is missing (main() prints it and exits with status 2)."""
    missing = missing_modules()
    if missing:
        raise ValueError(f"{what} needs the [rl] extra (missing: {', '.join(missing)}); install it with "
                         "pip install 'proma[rl]' (on CPU machines torch==2.13.0 first)")


def _real_cases(seed: int, cache_dir):
    """The real cases (:mod:`verification.studies.realcase`: the RL harness, which the oracle does not import)."""
    _refuse_without_rl("generating the real cases (leave them out with --no-real)")
    from .studies.realcase import real_cases

    return real_cases(seed=seed, cache_dir=cache_dir)


def _cmd_cases(args) -> int:
    return cmd_cases(args, make_real=_real_cases)


def _cmd_report(args) -> int:
    _refuse_without_rl("proma-verify report")
    from .report.generate import generate_report, refresh_oracle, rerender_report

    if args.render_only:
        print(f"report written to {rerender_report(args.out)}")
        return 0
    if args.refresh_oracle:
        print(f"report written to {refresh_oracle(args.out, runs_dir=args.runs)}")
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

    add_cases_parser(sub).set_defaults(fn=_cmd_cases)
    add_check_parser(sub)
    add_verl_parser(sub)

    p = sub.add_parser("report", help="run the small GSM8K configurations and write REPORT.md")
    p.add_argument("--out", required=True, type=Path, help="report directory (REPORT.md, PNGs, JSON)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="reduced runs (a few minutes); default: the full runs")
    mode.add_argument("--smoke", action="store_true", help="tiny runs for CI (seconds)")
    mode.add_argument("--render-only", action="store_true",
                      help="rewrite REPORT.md and its figures from OUT/data (a report already run); runs nothing")
    mode.add_argument("--refresh-oracle", action="store_true",
                      help="rerun only the oracle phase of a report already run (its mode and seed), then re-render")
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
