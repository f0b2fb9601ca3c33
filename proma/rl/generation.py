"""Generation: sample completions with the KV cache (``model.generate``) and pack them as sequence batches.

The step-seeded rollout of a training step (prompts, rewards, advantages) is built on this in ``rollout``.

Batch layout used everywhere after generation (a "sequence batch", a dict of tensors, b sequences, t tokens):

``input_ids`` (b, t) long
    prompt tokens then completion tokens, RIGHT-padded with the pad id (so positions are 0..len-1 with no
    offset, and a causal model's outputs at real tokens do not depend on padding).
``attention_mask`` (b, t) long
    1 on real tokens.
``score_mask`` (b, t) float
    1 on completion tokens (generated tokens up to and including EOS); token t is predicted by the logits at
    t - 1, so column 0 is always 0.

Generation uses LEFT padding (what batched generation needs); sequences are re-packed right-padded afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def pack(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device) -> dict:
    """Right-padded sequence batch of ``prompt_i + completion_i`` with the completion tokens scored."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    b, t = len(prompts), max(lengths)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, t), dtype=torch.long)
    score_mask = torch.zeros((b, t), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        if not p:
            raise ValueError(f"sequence {i}: empty prompt (the first completion token needs a context)")
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, :n] = 1
        score_mask[i, len(p):n] = 1.0
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "score_mask": score_mask.to(device),
    }


def select(batch: dict, idx) -> dict:
    """Rows ``idx`` of a sequence batch, trimmed to their longest sequence."""
    out = {k: v[idx] for k, v in batch.items()}
    t = int(out["attention_mask"].sum(1).max().item())
    return {k: v[:, :t] for k, v in out.items()}


@dataclass
class Completions:
    """Completions for ``len(prompts)`` prompts x ``group_size`` samples (group-major: rows g*G .. g*G+G-1)."""

    prompt_ids: list[list[int]]      # per sequence (repeated within a group)
    completion_ids: list[list[int]]  # per sequence, generated tokens through EOS when it was produced
    texts: list[str]                 # decoded completions without special tokens
    truncated: list[bool]            # True when the length limit cut the completion before EOS


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, group_size: int, max_new_tokens: int,
             greedy: bool = False, temperature: float = 1.0, device="cpu") -> Completions:
    """Sample ``group_size`` completions per prompt (pure temperature sampling: no top-k / top-p), or greedy.

    Sampling draws from torch's global RNG: seed it before calling for reproducible rollouts.
    """
    enc = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    if tokenizer.padding_side != "left":
        raise ValueError("tokenizer.padding_side must be 'left' for batched generation")
    ids = enc["input_ids"].repeat_interleave(group_size, 0).to(device)
    mask = enc["attention_mask"].repeat_interleave(group_size, 0).to(device)
    was_training = model.training
    model.eval()
    sample_kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        **sample_kwargs,
    )
    model.train(was_training)
    gen = out[:, ids.shape[1]:].tolist()
    eos = tokenizer.eos_token_id
    completion_ids, truncated = [], []
    for row in gen:
        if eos in row:
            completion_ids.append(row[: row.index(eos) + 1])
            truncated.append(False)
        else:
            completion_ids.append(row)
            truncated.append(True)
    prompt_rows = [[int(x) for x, m in zip(r, mr) if m] for r, mr in zip(ids.tolist(), mask.tolist())]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Completions(prompt_rows, completion_ids, texts, truncated)
