"""The policy: a small ``Qwen3ForCausalLM`` (tied embeddings, as Qwen3-0.6B) or any local HF causal LM, and the
supervised warm-start that gives it non-zero reward before RL.

The warm-start checkpoint is cached as a regular Hugging Face directory (``save_pretrained`` of model and
tokenizer, plus ``warmstart.json``) under ``<cache_dir>/warmstart-<key>``, where the key hashes everything that
determines it (task, model shape, tokenizer, warm-start options, seed). Runs that share ``--cache-dir`` reuse
one warm-start; the directory is also loadable with ``--model``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch

# Supervised warm-start: AdamW with cosine decay from warmstart_lr to WARMSTART_FINAL_LR_FRACTION of it, and
# gradient clipping, as usual for short supervised fine-tuning of small transformers.
WARMSTART_BETAS = (0.9, 0.99)
WARMSTART_WEIGHT_DECAY = 0.01
WARMSTART_FINAL_LR_FRACTION = 0.1
WARMSTART_GRAD_CLIP = 1.0
WARMSTART_SEED_OFFSET = 1        # the batch sampler's seed is cfg.seed + 1: a stream apart from the model init's
LOSS_EMA_WEIGHT = 0.05           # weight of the newest loss in the smoothed loss shown on the progress bar


def model_config(cfg, tokenizer):
    """``Qwen3Config`` of the small policy described by ``cfg`` (hidden_size, num_layers, ...)."""
    from transformers import Qwen3Config

    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"hidden_size={cfg.hidden_size} must be a multiple of num_heads={cfg.num_heads}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"num_heads={cfg.num_heads} must be a multiple of num_kv_heads={cfg.num_kv_heads}")
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )


def build_policy(cfg, tokenizer):
    """A freshly initialised small Qwen3 (deterministic under ``cfg.seed``)."""
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(cfg.seed)
    model = Qwen3ForCausalLM(model_config(cfg, tokenizer))
    return model


def load_policy(path, *, dtype=None):
    """Load a local HF causal-LM checkpoint and its tokenizer from directory ``path`` (no network).

    The tokenizer gets left padding (for batched generation) and a pad token (EOS when it has none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ValueError(f"model={str(path)!r}: not a local Hugging Face checkpoint directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"model={str(path)!r}: its tokenizer has no EOS token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with quiet_hf():
        model = AutoModelForCausalLM.from_pretrained(p, **kwargs)
    return model, tokenizer


@contextlib.contextmanager
def quiet_hf(quiet: bool = True):
    """Silence transformers' own progress bars ("Loading weights", "Writing model shards") meanwhile."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------------------------
# Supervised warm-start
# --------------------------------------------------------------------------------------------------------------

def warmstart_key(cfg, tokenizer) -> str:
    """Hash of everything that determines the warm-start weights."""
    from .tokenizer import fingerprint

    fields = {
        "task": cfg.task,
        "model": cfg.model,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "max_positions": cfg.max_positions,
        "tokenizer": fingerprint(tokenizer),
        "warmstart_steps": cfg.warmstart_steps,
        "warmstart_batch": cfg.warmstart_batch,
        "warmstart_lr": cfg.warmstart_lr,
        "seed": cfg.seed,
        "dtype": cfg.dtype,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def supervised_batch(tokenizer, examples, device):
    """Right-padded teacher-forcing batch ``prompt + target + EOS`` with the target and EOS tokens scored."""
    from .generation import pack

    prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in examples]
    targets = [tokenizer(e.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for e in examples]
    return pack(prompts, targets, tokenizer.pad_token_id, device)


def supervised_warmstart(cfg, model, tokenizer, examples, device, *, log=print):
    """Train ``model`` with teacher forcing on ``examples`` (AdamW, cosine decay to 10% of the peak), in place.

    Loss: mean over scored tokens of -log p(token). Deterministic under ``cfg.seed``.
    """
    from .losses import token_logprobs

    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(cfg.seed + WARMSTART_SEED_OFFSET)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmstart_lr, weight_decay=WARMSTART_WEIGHT_DECAY,
                            betas=WARMSTART_BETAS)
    low = WARMSTART_FINAL_LR_FRACTION
    model.train()
    n = len(examples)
    bar = tqdm(range(cfg.warmstart_steps), desc="warm-start", disable=not cfg.progress, leave=False)
    loss_ema = None
    for step in bar:
        lr = cfg.warmstart_lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.warmstart_steps))))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, n, (cfg.warmstart_batch,), generator=g).tolist()
        batch = supervised_batch(tokenizer, [examples[i] for i in idx], device)
        logp, _ = token_logprobs(model, batch)
        mask = batch["score_mask"]
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), WARMSTART_GRAD_CLIP)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else (1 - LOSS_EMA_WEIGHT) * loss_ema + LOSS_EMA_WEIGHT * loss.item()
        if cfg.progress:
            bar.set_postfix(loss=f"{loss_ema:.3f}")
    return loss_ema


def get_warmstarted(cfg, model, tokenizer, examples, device, cache_dir, *, log=print):
    """Load the cached warm-start for ``cfg`` into ``model`` or train and cache it. Returns its directory."""
    from transformers import AutoModelForCausalLM

    key = warmstart_key(cfg, tokenizer)
    path = Path(cache_dir) / f"warmstart-{key}"
    if (path / "warmstart.json").is_file():
        with quiet_hf():
            cached = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        model.load_state_dict(cached.state_dict())
        log(f"warm-start: loaded {path}")
        return path
    log(f"warm-start: training {cfg.warmstart_steps} steps -> {path}")
    import time

    t0 = time.perf_counter()
    final_loss = supervised_warmstart(cfg, model, tokenizer, examples, device, log=log)
    seconds = time.perf_counter() - t0
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_hf():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    (tmp / "warmstart.json").write_text(
        json.dumps({"key": key, "steps": cfg.warmstart_steps, "final_loss": final_loss, "seconds": seconds}, indent=1)
    )
    try:
        os.replace(tmp, path)  # atomic publish; a concurrent run that won the race keeps its (identical) copy
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
