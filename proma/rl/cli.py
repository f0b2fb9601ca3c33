"""``proma`` command line: ``proma train [--preset smoke|small] [--<option> VALUE ...]`` and
``proma summary RUN_DIR...``.

Every ``TrainConfig`` field is an option (underscores become dashes: ``--prompts-per-step 16``; booleans take
``--kl-metrics false``), with its field comment as help and, for enumerations, its choices (``config.CHOICES``).
The preset is applied first, then the options given. Bad options exit with status 2 and a one-line message
naming the option.
"""
from __future__ import annotations

import argparse
import os
import sys
import typing
from dataclasses import fields

from .config import CHOICES, PRESETS, TrainConfig, field_comments


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(conv):
    def parse(text: str):
        return None if text.strip().lower() in ("none", "") else conv(text)

    return parse


def _field_parser(f):
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    conv = {bool: _parse_bool, int: int, float: float, str: str}[base]
    return _optional(conv) if type(None) in args else conv


def _metavar(f, hint) -> str:
    if f.name in CHOICES:
        return "{" + ",".join(CHOICES[f.name]) + "}"
    return "{true,false}" if bool in (hint, *typing.get_args(hint)) else f.name.upper()


def _shown(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proma", description="PROMA RL harness on GSM8K")
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a policy with one method; writes <out>/metrics.jsonl",
                        description="Train a policy with one method. Every option defaults to the preset's value "
                                    "(shown for the small preset); options given override it.")
    tr.add_argument("--preset", choices=sorted(PRESETS), default="small",
                    help=f"{field_comments()['preset']} (default: small)")
    tr.add_argument("--smoke", action="store_true", help="shorthand for --preset smoke")
    defaults, hints, comments = TrainConfig(), typing.get_type_hints(TrainConfig), field_comments()
    for f in fields(TrainConfig):
        if f.name == "preset":
            continue
        value = getattr(defaults, f.name)
        # choices are listed, not enforced here: TrainConfig's check names the option in its message
        tr.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_field_parser(f), default=None,
                        metavar=_metavar(f, hints[f.name]),
                        help=comments[f.name] + ("" if value is None else f" (small: {_shown(value)})"))
    sm = sub.add_parser("summary", help="markdown table of finished runs (reward, accuracy, local KL)")
    sm.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    return parser


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    preset = "smoke" if ns.smoke else ns.preset
    overrides = {f.name: getattr(ns, f.name) for f in fields(TrainConfig)
                 if f.name != "preset" and getattr(ns, f.name) is not None}
    return TrainConfig.from_preset(preset, **overrides)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "train":
        from . import run

        try:
            cfg = config_from_args(ns)
            run_dir = run(cfg)
        except ValueError as e:
            parser.exit(2, f"proma train: error: {e}\n")
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for the run
            print(f"run directory: {run_dir}")
        return 0
    if ns.command == "summary":
        from .summary import markdown_table

        try:
            print(markdown_table(ns.run_dirs))
        except (ValueError, OSError) as e:
            parser.exit(2, f"proma summary: error: {e}\n")
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
