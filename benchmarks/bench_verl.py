"""PROMA inside verl's step against plain verl (verl 0.7.1, CPU, one process, no FSDP).

One ``update_policy`` of verl's ``DataParallelPPOActor`` (the baseline) and of ``PromaDataParallelPPOActor`` with
exact PROMA and with the published settings, on a random Qwen3 (hidden 256, 4 layers, vocabulary 2048, float32),
32 sequences of 128 tokens (64 prompt + 64 response) in 4 micro-batches of 8, GRPO-like groups of 4; the optimizer
is SGD with learning rate 0 (the step's arithmetic without moving the weights, so every repetition sees the same
model). Wall clock of the whole ``update_policy`` (forwards, backwards, the optimizer step); repetitions interleaved
(plain, exact, published, plain, ...) after one warm-up each; the minimum per method and its ratio to plain verl's
minimum, in the default thread environment; the process CPU time (``time.process_time``, all threads) beside it,
the steadier figure on a machine shared with other jobs. Needs the verl 0.7.1 environment (docs/verl.md)::

    python benchmarks/bench_verl.py [--reps 5] [--markdown]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

HIDDEN, LAYERS, VOCAB, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 256, 4, 2048, 4, 2, 64, 768
SEQUENCES, PROMPT, RESPONSE, MICRO = 32, 64, 64, 8
GROUP = 4
METHODS = {"plain verl": None, "exact": dict(proma_variant="proma", proma_solver="exact"),
           "published": dict(proma_variant="proma", proma_solver="gram_schmidt", proma_passes=2,
                             proma_relative_bound=0.5)}


def build_model(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=INTERMEDIATE,
                      max_position_embeddings=PROMPT + RESPONSE, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg)


def build_batch(seed: int = 0):
    from verl import DataProto

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, VOCAB, (SEQUENCES // GROUP, PROMPT), generator=g).repeat_interleave(GROUP, 0)
    responses = torch.randint(3, VOCAB, (SEQUENCES, RESPONSE), generator=g)
    rewards = torch.rand(SEQUENCES, generator=g).view(-1, GROUP)
    adv = ((rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-6)).view(-1)
    mask = torch.ones(SEQUENCES, PROMPT + RESPONSE, dtype=torch.long)
    tensors = {"input_ids": torch.cat([prompts, responses], 1), "attention_mask": mask,
               "position_ids": torch.arange(PROMPT + RESPONSE).expand(SEQUENCES, -1).contiguous(),
               "responses": responses, "response_mask": torch.ones(SEQUENCES, RESPONSE, dtype=torch.long),
               "advantages": adv[:, None].expand(-1, RESPONSE).contiguous(),
               "old_log_probs": torch.zeros(SEQUENCES, RESPONSE)}
    return DataProto.from_dict(tensors=tensors, meta_info={"temperature": 1.0, "pad_token_id": 0})


def build_actor(name: str, model):
    from verl.workers.actor.dp_actor import DataParallelPPOActor
    from verl.workers.config import FSDPActorConfig, FSDPEngineConfig

    from proma.integrations.verl import PromaActorConfig, PromaDataParallelPPOActor

    extra = METHODS[name]
    cls, config_cls = (DataParallelPPOActor, FSDPActorConfig) if extra is None else \
        (PromaDataParallelPPOActor, PromaActorConfig)
    config = config_cls(strategy="fsdp2", rollout_n=GROUP, ppo_mini_batch_size=SEQUENCES,
                        ppo_micro_batch_size_per_gpu=MICRO, use_torch_compile=False,
                        fsdp_config=FSDPEngineConfig(dtype="float32"), **(extra or {}))
    return cls(config, model, torch.optim.SGD(model.parameters(), lr=0.0))


def step_seconds(actor, batch) -> tuple[float, float]:
    """(wall clock, CPU time of this process) of one ``update_policy``."""
    start, cpu = time.perf_counter(), time.process_time()
    actor.update_policy(batch)
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv=None) -> None:
    import warnings

    import torch.distributed as dist

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--markdown", action="store_true", help="print the result as a Markdown table")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("gloo", rank=0, world_size=1)
    batch = build_batch()
    actors = {name: build_actor(name, build_model()) for name in METHODS}
    for name, actor in actors.items():   # warm-up
        step_seconds(actor, batch)
    times = {name: [] for name in METHODS}
    cpu = {name: [] for name in METHODS}
    for _ in range(args.reps):
        for name, actor in actors.items():
            wall, used = step_seconds(actor, batch)
            times[name].append(wall)
            cpu[name].append(used)
    base, cpu_base = min(times["plain verl"]), min(cpu["plain verl"])
    n_params = sum(p.numel() for p in build_model().parameters())
    print(f"Qwen3 hidden {HIDDEN}, {LAYERS} layers, vocabulary {VOCAB}, tied ({n_params:,} parameters, float32); "
          f"{SEQUENCES} sequences x {PROMPT + RESPONSE} tokens in {SEQUENCES // MICRO} micro-batches of {MICRO}; "
          f"{torch.get_num_threads()} torch threads; min of {args.reps} interleaved repetitions after a warm-up")
    if args.markdown:
        print("\n| method | wall min (s) | vs plain verl | process CPU min (s) | vs plain verl | wall, all repetitions (s) |"
              "\n|---|---|---|---|---|---|")
    for name, ts in times.items():
        reps = ", ".join(f"{t:.2f}" for t in ts)
        c = min(cpu[name])
        if args.markdown:
            print(f"| {name} | {min(ts):.3f} | {min(ts) / base:.2f}x | {c:.3f} | {c / cpu_base:.2f}x | {reps} |")
        else:
            print(f"{name:12s} wall min {min(ts):7.3f} s {min(ts) / base:5.2f}x  CPU min {c:7.3f} s "
                  f"{c / cpu_base:5.2f}x plain verl   ({reps})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
