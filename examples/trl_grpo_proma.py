"""GRPO with PROMA inside TRL: the harness's small Qwen3 on GSM8K-calc prompts, on CPU.

The policy, tokenizer, prompts and reward are the RL harness's own (``proma.rl``); the training loop is TRL's
``GRPOTrainer`` with PROMA's accumulation (``proma.integrations.trl.PromaGRPOTrainer``). Nothing touches the
network. The policy is, in order of preference:

1. ``--model DIR``: any local Hugging Face checkpoint directory (a warm-start directory is one);
2. the harness's cached supervised warm-start of ``--preset`` in ``--cache-dir`` (written by
   ``proma train --cache-dir runs/cache ...``; the ``small`` preset's 3000 steps are the slow part of a first run);
3. otherwise a short warm-start of ``--warmstart-steps`` steps (cached in ``--cache-dir`` too, so a rerun
   reuses it), or with ``--warmstart-steps 0`` the freshly initialised policy (its reward stays near 0).

The script says which one it used. Each optimizer step prints the mean reward and PROMA's removed ratio
(||R|| / ||incoming gradient|| of microbatches 2..M, the first having nothing to remove; docs/trl.md defines
the metrics) and mean Gram rank. Run::

    python examples/trl_grpo_proma.py                       # PROMA (exact) on the small preset
    python examples/trl_grpo_proma.py --variant none        # TRL's own gradient, for comparison
    python examples/trl_grpo_proma.py --lora-rank 8 --oracle-dir cases/   # LoRA adapters; oracle case of step 1
    proma-verify check --cases cases/ --impl torch          # ... checked
    python examples/trl_grpo_proma.py --help

Under ``torchrun --nproc_per_node 2`` (add ``--sync global`` for the global projection), ``--oracle-dir``
gets one case per rank (local) or one of the union microbatches (global).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
import warnings
from pathlib import Path

import torch

from proma.integrations.trl import PromaGRPOConfig, PromaGRPOTrainer
from proma.options import ACCUMULATOR_SOLVERS, SYNCS, VARIANTS
from proma.rl.config import DEFAULT_NEW_TOKENS, PRESETS, TrainConfig
from proma.rl.data import make_examples, reward
from proma.rl.model import build_policy, count_parameters, get_warmstarted, load_policy, warmstart_key
from proma.rl.build import prompt_pool
from proma.rl.tokenizer import get_tokenizer

TASK = "gsm8k-calc"
DEFAULT_CACHE_DIR = "runs/cache"        # the harness README's shared cache (``proma train --cache-dir runs/cache``)
DEFAULT_FALLBACK_WARMSTART_STEPS = 40   # short warm-start when the harness's is not cached
FALLBACK_WARMSTART_BATCH = 32


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--variant", choices=VARIANTS, default="proma",
                    help="proma_variant: proma = remove from the accumulated gradient its part in the span of "
                         "each new microbatch's per-sequence gradients; intra = project each microbatch's own "
                         "gradient off its dominant activation / output-gradient subspaces; none = TRL's gradient")
    ap.add_argument("--solver", choices=ACCUMULATOR_SOLVERS, default="exact",
                    help="projection solver of --variant proma (proma_solver)")
    ap.add_argument("--sync", choices=SYNCS, default="local", help="several processes: proma_sync")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="train LoRA adapters of this rank on every attention and MLP projection (needs peft); "
                         "0 = train the whole policy")
    ap.add_argument("--oracle-dir", default=None,
                    help="write the first optimizer step as an oracle case here (proma_oracle_dir)")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps (TRL max_steps)")
    ap.add_argument("--prompts-per-step", type=int, default=4, help="GSM8K-calc prompts per optimizer step")
    ap.add_argument("--group-size", type=int, default=8, help="completions per prompt (TRL num_generations)")
    ap.add_argument("--microbatch-size", type=int, default=8,
                    help="completions per microbatch (TRL per_device_train_batch_size); the step's completions "
                         "must split evenly into microbatches")
    ap.add_argument("--max-completion-length", type=int, default=DEFAULT_NEW_TOKENS[TASK],
                    help="longest completion in tokens")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    ap.add_argument("--preset", choices=tuple(PRESETS), default="small",
                    help="the harness's model preset (policy shape, tokenizer, warm-start recipe); smoke = tiny")
    ap.add_argument("--model", default=None,
                    help="local Hugging Face checkpoint directory to train instead (e.g. a cached warm-start)")
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR,
                    help="the harness's tokenizer and warm-start cache")
    ap.add_argument("--warmstart-steps", type=int, default=DEFAULT_FALLBACK_WARMSTART_STEPS,
                    help="steps of the short warm-start run when the harness's warm-start is not cached "
                         "(0 = train the freshly initialised policy)")
    ap.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on",
                    help="TRL's gradient_checkpointing (TRL's default is on)")
    ap.add_argument("--out", default="runs/trl_grpo_proma", help="TRL output_dir (nothing is saved there)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the policy init, the prompts and the sampling")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads when > 0")
    args = ap.parse_args(argv)
    for name in ("steps", "prompts_per_step", "group_size", "microbatch_size", "max_completion_length"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.group_size < 2:
        ap.error("--group-size must be >= 2 (group-relative advantages)")
    if (args.prompts_per_step * args.group_size) % args.microbatch_size:
        ap.error(f"--prompts-per-step x --group-size = {args.prompts_per_step * args.group_size} completions "
                 f"do not split into microbatches of --microbatch-size {args.microbatch_size}")
    if args.warmstart_steps < 0:
        ap.error("--warmstart-steps must be >= 0")
    if args.lora_rank < 0:
        ap.error("--lora-rank must be >= 0")
    return args


def build(args, log=print):
    """(policy, tokenizer, harness config, how the policy was obtained) as the options ask."""
    cfg = TrainConfig.from_preset(args.preset, seed=args.seed, cache_dir=args.cache_dir, progress=False)
    if args.model is not None:
        model, tokenizer = load_policy(args.model)
        return model, tokenizer, cfg, f"loaded --model {args.model}"
    tokenizer = get_tokenizer(cfg.vocab_size, args.cache_dir)
    model = build_policy(cfg, tokenizer)
    model.set_attn_implementation("eager")  # as the harness: faster than SDPA at these shapes on CPU
    cached = Path(args.cache_dir) / f"warmstart-{warmstart_key(cfg, tokenizer)}"
    train = make_examples(TASK, "train")
    if cfg.warmstart_steps > 0 and (cached / "warmstart.json").is_file():
        get_warmstarted(cfg, model, tokenizer, train, torch.device("cpu"), args.cache_dir, log=log)
        return model, tokenizer, cfg, f"the harness's warm-start ({cfg.warmstart_steps} steps) from {cached}"
    if args.warmstart_steps == 0:
        return model, tokenizer, cfg, f"freshly initialised (no warm-start cached at {cached}; reward stays ~0)"
    short = dataclasses.replace(cfg, warmstart_steps=args.warmstart_steps, warmstart_batch=FALLBACK_WARMSTART_BATCH)
    path = get_warmstarted(short, model, tokenizer, train, torch.device("cpu"), args.cache_dir, log=log)
    return model, tokenizer, cfg, (f"a short warm-start ({args.warmstart_steps} steps, {path}); the harness's "
                                   f"{cfg.warmstart_steps}-step warm-start is not cached at {cached}")


def prompt_dataset(cfg):
    """The harness's RL prompt pool of GSM8K-calc as a ``datasets.Dataset`` with columns prompt, answer."""
    from datasets import Dataset

    pool = prompt_pool(cfg, make_examples(TASK, "train"))
    return Dataset.from_dict({"prompt": [e.prompt for e in pool], "answer": [e.answer for e in pool]})


def calc_reward(completions, answer, **kwargs) -> list[float]:
    """TRL reward function: the harness's GSM8K-calc reward of each completion against its row's answer."""
    return [reward(TASK, c, a) for c, a in zip(completions, answer)]


def step_printer(log):
    """A callback printing each optimizer step's mean reward and PROMA's stats ("-" for --variant none)."""
    from transformers import TrainerCallback

    class StepPrinter(TrainerCallback):
        def __init__(self):
            self.records = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "reward" not in logs:
                return
            self.records.append(dict(logs, step=state.global_step))
            rank = logs.get("proma/gram_rank_mean")
            key = "intra_removed_ratio" if "proma/intra_removed_ratio" in logs else "removed_ratio"
            removed = logs.get(f"proma/{key}")
            log(f"step {state.global_step:3d}  reward {logs['reward']:.3f}  "
                f"{key} {'-' if removed is None else f'{removed:.4f}'}  "
                f"gram_rank {'-' if rank is None else f'{rank:.1f}'}  "
                f"completion_len {logs.get('completions/mean_length', float('nan')):.1f}")

    return StepPrinter()


def grpo_config(args) -> PromaGRPOConfig:
    completions = args.prompts_per_step * args.group_size
    return PromaGRPOConfig(
        output_dir=args.out, max_steps=args.steps, learning_rate=args.lr, seed=args.seed,
        per_device_train_batch_size=args.microbatch_size,
        gradient_accumulation_steps=completions // args.microbatch_size,
        num_generations=args.group_size, max_completion_length=args.max_completion_length,
        gradient_checkpointing=args.gradient_checkpointing == "on",
        loss_type="dapo", beta=0.0, num_iterations=1, temperature=1.0,
        use_cpu=True, bf16=False, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, proma_variant=args.variant, proma_solver=args.solver, proma_sync=args.sync,
        proma_oracle_dir=args.oracle_dir,
    )


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def with_lora(model, rank: int):
    """``model`` with LoRA adapters of ``rank`` (alpha = 2 rank, no dropout) on :data:`LORA_TARGETS`."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules=LORA_TARGETS))


def main(argv=None, log=print) -> list[dict]:
    """Train; return the per-step log records (reward, proma/removed_ratio, ...)."""
    from transformers import PrinterCallback

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer, cfg, source = build(args, log=log)
    log(f"policy: {source}; {count_parameters(model):,} parameters")
    if args.lora_rank:
        model = with_lora(model, args.lora_rank)
        log(f"LoRA rank {args.lora_rank}: {count_parameters(model):,} trainable parameters")
    printer = step_printer(log)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's notes on CPU-only and untuned settings
        trainer = PromaGRPOTrainer(model=model, reward_funcs=calc_reward, args=grpo_config(args),
                                   train_dataset=prompt_dataset(cfg), processing_class=tokenizer,
                                   callbacks=[printer])
        trainer.remove_callback(PrinterCallback)  # the step printer says what matters here
        trainer.train()
    rewards = [r["reward"] for r in printer.records]
    log(f"done: {len(rewards)} steps, variant {args.variant}, mean reward {sum(rewards) / max(1, len(rewards)):.3f}, "
        f"{time.perf_counter() - started:.0f} s")
    return printer.records


if __name__ == "__main__":
    records = main()
    if not records or not all(math.isfinite(r["reward"]) for r in records):
        raise SystemExit("no finite reward logged")
