"""``proma-verify verl``: the command line of the oracle's verl judge (:mod:`.verl`, imported when it runs).

    proma-verify verl --actor proma.integrations.verl:PromaDataParallelPPOActor --solver exact
    proma-verify verl --actor verl.workers.actor.dp_actor:DataParallelPPOActor --variant none

Exit status: 0 every judged array passes, 1 some array fails, 2 bad input (an actor that cannot be loaded).
"""
from __future__ import annotations

import importlib


def add_verl_parser(sub):
    p = sub.add_parser("verl", help="judge a verl DataParallelPPOActor-style actor against the reference")
    p.add_argument("--actor", required=True, help="package.module:Class of the actor")
    p.add_argument("--config-class", default=None, help="package.module:Class of its config (default: the "
                                                        "actor's module's PromaActorConfig if any, else verl's)")
    p.add_argument("--variant", default="proma", choices=("proma", "none", "intra"))
    p.add_argument("--solver", default="exact")
    p.add_argument("--passes", type=int, default=None, help="Gram-Schmidt sweeps (default: the case format's)")
    p.add_argument("--ridge", type=float, default=None, help="ridge regulariser (default: the case format's)")
    p.add_argument("--relative-bound", type=float, default=None)
    p.add_argument("--shrinkage", type=float, default=None)
    p.add_argument("--published", action="store_true", help="declare the published settings (gram_schmidt, "
                                                             "2 passes, relative bound 0.5)")
    p.add_argument("--loss-agg-mode", action="append", default=None, help="repeatable; default token-mean")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(fn=cmd_verl)
    return p


def cmd_verl(args) -> int:
    """``proma-verify verl``: build, run, judge, print the table; exit 0 pass, 1 fail, 2 bad input."""
    import sys

    import torch.distributed as dist

    from .settings import Settings
    from .verl import ensure_process_group, judge_actor, load_class, use_torch_unpad

    try:
        actor_cls = load_class(args.actor)
        config_cls = load_class(args.config_class) if args.config_class else None
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if config_cls is None:
        config_cls = getattr(importlib.import_module(actor_cls.__module__), "PromaActorConfig", None)
    if args.published:
        args.solver, args.passes, args.relative_bound = "gram_schmidt", 2, 0.5
    given = dict(passes=args.passes, ridge=args.ridge, relative_bound=args.relative_bound, shrinkage=args.shrinkage)
    settings = Settings(variant=args.variant, solver=args.solver, **{k: v for k, v in given.items() if v is not None})
    ensure_process_group(dist)
    use_torch_unpad()
    result = judge_actor(actor_cls, settings, config_cls=config_cls,
                         loss_agg_modes=tuple(args.loss_agg_mode or ("token-mean",)))
    print(result.table(verbose=args.verbose))
    return result.exit_code


