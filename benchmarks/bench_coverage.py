"""Cost of the coverage check (proma.coverage): one proma exact backward with and without it, small Qwen3.

Usage::

    python benchmarks/bench_coverage.py [--repeats 15] [--b 8] [--T 64] [--threads 1]

Model: ``Qwen3ForCausalLM``, hidden 256, 4 layers, 4 heads of 64 (2 KV heads), MLP 768, vocabulary 512, tied
embeddings (as bench_accumulator.py). Per repetition, interleaved: forward + ``acc.backward`` with the check,
the same without it (``proma.coverage.check_uses`` replaced by a no-op), and the check alone on a fresh
graph, and the hooked forward with and without recording each call's nodes (``call_nodes``). Reports
the minimum over repetitions of each and the ratios with / without.
"""
from __future__ import annotations

import argparse
import time

import torch

import proma.capture as capture_mod
from proma import ProjectedAccumulator


def small_qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg)


def seq_logp(model, ids):
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1).sum(1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--b", type=int, default=8)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = small_qwen3()
    ids = torch.randint(0, 512, (a.b, a.T), generator=torch.Generator().manual_seed(1))
    w = torch.randn(a.b)
    real_check, real_record = capture_mod.coverage.check_uses, capture_mod.coverage.call_nodes
    times = {"with check": [], "without check": [], "check alone": [], "forward recording": [],
             "forward not recording": []}
    with ProjectedAccumulator(model, solver="exact") as acc:
        for rep in range(a.repeats + 1):
            # alternate the order: the first of a pair runs on a warmer / colder allocator
            for label in ("with check", "without check")[::1 if rep % 2 else -1]:
                capture_mod.coverage.check_uses = real_check if label == "with check" else (lambda *x: 0)
                acc.zero_grad()
                acc.backward(seq_logp(model, ids), w)   # G = 0 -> one microbatch with a projection next
                lp = seq_logp(model, ids)
                t0 = time.perf_counter()
                acc.backward(lp, w)
                if rep:
                    times[label].append(time.perf_counter() - t0)
            capture_mod.coverage.check_uses = real_check
            lp = seq_logp(model, ids)
            cap = acc._capture
            t0 = time.perf_counter()
            real_check(lp, cap._covered.values(), cap._owned, cap._taps)
            if rep:
                times["check alone"].append(time.perf_counter() - t0)
            cap.discard()
            for label in ("forward recording", "forward not recording")[::1 if rep % 2 else -1]:
                capture_mod.coverage.call_nodes = real_record if label == "forward recording" else (lambda *x: {})
                t0 = time.perf_counter()
                seq_logp(model, ids)
                if rep:
                    times[label].append(time.perf_counter() - t0)
                cap.discard()
            capture_mod.coverage.call_nodes = real_record
    best = {k: min(v) for k, v in times.items()}
    for k, v in best.items():
        print(f"{k:>14}: {1e3 * v:8.2f} ms (min of {a.repeats})")
    print(f"backward ratio with / without check: {best['with check'] / best['without check']:.3f}")
    print(f"forward ratio recording / not: {best['forward recording'] / best['forward not recording']:.3f}")


if __name__ == "__main__":
    main()
