"""Greedy validation of a policy on the run's fixed test subset: accuracy, per-item hits, the eval.jsonl record."""
from __future__ import annotations

import math

import numpy as np

from . import data
from .distributed import Ranks
from .build import RunParts
from .generation import generate

EVAL_BATCH_SIZE = 128  # prompts per greedy generation call


def evaluate(parts: RunParts, batch_size: int = EVAL_BATCH_SIZE, ranks: Ranks = Ranks(), *, per_item: bool = False):
    """Greedy exact-match accuracy on the fixed test subset (each rank scores every W-th example).

    ``per_item=True`` returns ``(accuracy, hits)`` with ``hits`` the (n_items,) 0/1 hits of THIS rank's items
    (every item on one rank), so that callers can pair items between policies.
    """
    cfg, hits = parts.cfg, []
    mine = parts.eval_examples[ranks.rank::ranks.world]
    for lo in range(0, len(mine), batch_size):
        chunk = mine[lo: lo + batch_size]
        completions = generate(parts.model, parts.tokenizer, [e.prompt for e in chunk], group_size=1,
                               max_new_tokens=cfg.new_tokens, greedy=True, device=parts.device)
        hits += [data.hit(cfg.task, t, e.answer) for t, e in zip(completions.texts, chunk)]
    acc = ranks.sum([float(sum(hits))])[0] / max(1, len(parts.eval_examples))
    return (acc, np.asarray(hits, dtype=np.int8)) if per_item else acc


def eval_record(parts: RunParts, step: int, opt_step: int, ranks: Ranks = Ranks()) -> dict:
    """The ``eval.jsonl`` record: greedy accuracy, the number of items and its binomial standard error."""
    acc, n = evaluate(parts, ranks=ranks), len(parts.eval_examples)
    return {"step": step, "opt_step": opt_step, "val/accuracy": acc, "val/n": n,
            "val/se": math.sqrt(acc * (1 - acc) / n) if n else float("nan")}

