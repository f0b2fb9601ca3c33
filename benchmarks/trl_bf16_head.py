"""How far PromaGRPOTrainer(proma_variant="none") is from TRL's own GRPOTrainer, in float32 and with bf16 autocast.

PromaGRPOTrainer computes log-probabilities through the model's unfused LM head (PROMA's hooks must see the
tied weight's use); TRL's GRPOTrainer uses its fused head. In float32 the two heads agree to rounding; under
bf16 autocast they round differently. Measured on the tiny Qwen3 of tests/integrations/trl_testkit.py (CPU,
one optimizer step of 2 microbatches x 4 completions, AdamW, lr 1e-3), per seed:

- grad: ||g_ours - g_trl|| / ||g_trl|| over every parameter, just before the optimizer step;
- update: ||u_ours - u_trl|| / ||u_trl||, u = the parameter change of that first AdamW step;
- unfused grad: the same gradient comparison against TRL's trainer given the same unfused head (the head
  alone explains the bf16 difference when this stays at float32 rounding).

Run (about a minute)::

    python benchmarks/trl_bf16_head.py [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch


from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from proma.integrations.trl import PromaGRPOConfig, PromaGRPOTrainer  # noqa: E402
from verification.trl_testkit import config, run, tiny_policy, tiny_tokenizer  # noqa: E402


class UnfusedGRPOTrainer(GRPOTrainer):
    """TRL's trainer with PromaGRPOTrainer's unfused LM head (same log-probability code)."""

    _get_per_token_logps_and_entropies = PromaGRPOTrainer._get_per_token_logps_and_entropies


def _rel(a: dict, b: dict, names) -> float:
    x = torch.cat([a[n].reshape(-1).double() for n in names])
    y = torch.cat([b[n].reshape(-1).double() for n in names])
    return float((x - y).norm() / y.norm())


def _train(trainer_cls, cfg_cls, out, tokenizer, policy, **overrides):
    """(gradient before the step, parameter change of the step) of one optimizer step."""
    model = copy.deepcopy(policy)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, grads = run(trainer_cls, config(cfg_cls, out, **overrides), tokenizer, model)
    update = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return grads, update


def measure(seed: int, bf16: bool, tokenizer, tmp: Path) -> dict:
    policy = tiny_policy(tokenizer, seed=seed)
    common = dict(bf16=bf16, seed=seed)
    g_trl, u_trl = _train(GRPOTrainer, GRPOConfig, tmp / "trl", tokenizer, policy, **common)
    g_ours, u_ours = _train(PromaGRPOTrainer, PromaGRPOConfig, tmp / "ours", tokenizer, policy,
                            proma_variant="none", **common)
    g_unf, _ = _train(UnfusedGRPOTrainer, GRPOConfig, tmp / "unfused", tokenizer, policy, **common)
    names = [n for n, g in g_trl.items() if g is not None]
    return {"grad": _rel(g_ours, g_trl, names), "update": _rel(u_ours, u_trl, names),
            "unfused grad": _rel(g_ours, g_unf, names)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)
    tokenizer = tiny_tokenizer()
    print("| dtype | seed | grad rel diff vs GRPOTrainer | first AdamW update rel diff | grad vs unfused TRL |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for bf16 in (False, True):
            for seed in args.seeds:
                r = measure(seed, bf16, tokenizer, Path(tmp))
                print(f"| {'bf16 autocast' if bf16 else 'float32'} | {seed} | {r['grad']:.2e} | {r['update']:.2e} "
                      f"| {r['unfused grad']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
