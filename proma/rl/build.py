"""What a run is built from: the device, the prompt pool, the fixed evaluation subset and the (warm-started) policy.

``build_run(cfg)`` -> :class:`RunParts`, shared by ``train``, ``batching.sample_microbatch`` and the verification
suite (which builds the same policy and data a run trains on).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import TrainConfig
from .data import make_examples
from .model import build_policy, count_parameters, get_warmstarted, load_policy
from .tokenizer import get_tokenizer

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# Seeds of the two seed-independent subsets, so every run of a grid trains on the same prompt pool and is
# scored on the same test items whatever its own ``seed``.
TRAIN_POOL_SEED = 54321
EVAL_SUBSET_SEED = 12345


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a named cuda device must be available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available")
    return dev


@dataclass
class RunParts:
    """Everything a run needs before its first rollout (``build_run``)."""

    cfg: TrainConfig
    device: torch.device
    run_dir: Path
    tokenizer: object
    model: torch.nn.Module
    train_examples: list        # the RL prompt pool (cfg.train_pool of the train split)
    eval_examples: list
    warmstart_dir: Path | None
    heldout_examples: list = field(default_factory=list)  # the whole test split (the out-of-sample KL's prompts)


def prompt_pool(cfg: TrainConfig, train_examples: list) -> list:
    """The RL prompt pool: a fixed (seed-independent) subset of the train split, so each prompt is revisited
    a few times within a short run; the warm-start uses the whole split."""
    if not cfg.train_pool or cfg.train_pool >= len(train_examples):
        return train_examples
    pool = np.random.default_rng(TRAIN_POOL_SEED).permutation(len(train_examples))[: cfg.train_pool]
    return [train_examples[i] for i in sorted(pool)]


def eval_subset(cfg: TrainConfig, test_examples: list) -> list:
    """The fixed evaluation subset: a seed-independent shuffle of the test split, cut to ``eval_size``."""
    order = np.random.default_rng(EVAL_SUBSET_SEED).permutation(len(test_examples))[: cfg.eval_size]
    return [test_examples[i] for i in order]


def build_run(cfg: TrainConfig, *, log=print) -> RunParts:
    """Build (or load) everything ``cfg``'s run needs before its first rollout."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.out)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else run_dir / "cache"
    train_examples = make_examples(cfg.task, "train", cfg.data_dir)
    test_examples = make_examples(cfg.task, "test", cfg.data_dir)
    eval_examples = eval_subset(cfg, test_examples)
    warm_dir = None
    if cfg.model is not None:
        model, tokenizer = load_policy(cfg.model)
        log(f"policy: loaded {cfg.model}")
    else:
        tokenizer = get_tokenizer(cfg.vocab_size, cache_dir, cfg.data_dir)
        model = build_policy(cfg, tokenizer)
        if cfg.dtype != "float64":  # HF eager attention gives NaN on left-padded float64 batches
            model.set_attn_implementation("eager")  # faster than SDPA for these small shapes on CPU
    model.to(device=device, dtype=DTYPES[cfg.dtype])
    if cfg.model is None and cfg.warmstart_steps > 0:
        warm_dir = get_warmstarted(cfg, model, tokenizer, train_examples, device, cache_dir, log=log)
    log(f"policy: {count_parameters(model):,} parameters, vocab {len(tokenizer)}, device {device}")
    return RunParts(cfg, device, run_dir, tokenizer, model, prompt_pool(cfg, train_examples), eval_examples, warm_dir,
                    test_examples)
