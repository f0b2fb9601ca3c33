"""Oracle cases taken from a real Qwen3-architecture policy on a real GSM8K microbatch.

The policy is ``proma.rl``'s small ``Qwen3ForCausalLM`` (tied input/output embeddings, like Qwen3-0.6B),
shrunk so that the case files stay small, warm-started on GSM8K calculator steps; the rollout is sampled by
``proma.rl`` exactly as in training (prompts, G completions each, rewards, group advantages, shuffled
minibatch, per-sequence weights of the token-mean aggregation). The first rollout step whose minibatch has
non-zero weights in the most microbatches is used (groups whose samples all got the same reward have zero
advantage, and a case whose weights are all zero would test nothing).

The factors are captured from a float64 copy of the policy with this package's own hooks
(:mod:`verification.oracle.model_case`): every ``nn.Linear`` call is a ``"linear"`` use, and every parameter with any
other owner (the embedding tied to the head, norm weights) gets a ``"dense"`` use holding its per-sequence
gradients from b backward passes minus what its linear uses contribute. Expected results: the NumPy
reference (:func:`verification.oracle.expected.compute_expected`).
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np

from proma.options import PUBLISHED_SETTINGS

from ..oracle.model_case import capture_case_arrays  # noqa: F401  (re-exported: the TRL writer imports it here)
from ..oracle.expected import compute_expected
from ..oracle.format import Case, Settings

# The policy and rollout of the real cases: a shrunk Qwen3 (about 56k parameters) with a short warm-start.
REAL_POLICY = dict(
    task="gsm8k-calc", vocab_size=300, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4,
    num_kv_heads=2, warmstart_steps=600, warmstart_batch=32, warmstart_lr=3e-3, prompts_per_step=6,
    group_size=8, minibatches=2, microbatch_size=8, max_new_tokens=8, progress=False,
)
REAL_SETTINGS = (
    ("qwen3_gsm8k_exact", "exact PROMA", Settings(variant="proma", solver="exact")),
    ("qwen3_gsm8k_paper", "the published settings (Gram-Schmidt 2 passes, relative_bound 0.5)",
     Settings(**PUBLISHED_SETTINGS)),
    ("qwen3_gsm8k_intra", "intra-microbatch projection, two-sided, rank 1",
     Settings(variant="intra", intra_rank=1, intra_form="two_sided")),
)


def pick_minibatch(s, start_step: int = 0, max_scan: int = 60):
    """First rollout step >= ``start_step`` whose minibatch has non-zero weights in the most microbatches.

    ``s`` is a ``proma.rl.build.RunParts``. Rollouts are drawn exactly as training draws them (step-seeded).
    Returns ``(step, batches, weights)``: per microbatch a sequence batch and its (b_m,) float64 weights.
    """
    from proma.rl.batching import microbatch_weights, minibatch_order, minibatch_rows
    from proma.rl.generation import select
    from proma.rl.rollout import collect_rollout

    cfg, best = s.cfg, None
    for step in range(start_step, start_step + max_scan):
        ro = collect_rollout(s, step)
        order = minibatch_order(cfg, step)
        for mb_index in range(cfg.minibatches):
            rows = minibatch_rows(cfg, order, mb_index)
            mbs, mb_weights = microbatch_weights(cfg, ro, rows)
            ws = [w.double().cpu().numpy() for w in mb_weights]
            score = (sum(bool(np.any(x)) for x in ws), sum(int(np.count_nonzero(x)) for x in ws))
            if best is None or score > best[0]:
                best = (score, step, [select(ro.batch, mb) for mb in mbs], ws)
        if best[0][0] == len(mbs):
            break
    if best[0][0] == 0:
        raise RuntimeError(f"no rollout step in {start_step}..{start_step + max_scan - 1} gave a non-zero "
                           "advantage (every group's samples got the same reward)")
    return best[1], best[2], best[3]


def warmstart_cache() -> Path:
    """Default directory of the real-case policy's warm-start checkpoint: under the user's cache directory, so the
    5-minute warm-start runs once per machine (the checkpoint's name is a hash of its configuration)."""
    from ..oracle.golden import cache_root

    return cache_root() / "realcase-warmstart"


def real_rollout(*, seed: int = 0, cache_dir=None, log=None, **overrides):
    """Build the real-case policy (:data:`REAL_POLICY`) and pick a real minibatch: ``(run parts, step, batches, weights)``.

    ``cache_dir``: where the warm-start checkpoint is kept (default :func:`warmstart_cache`).
    """
    from proma.rl.config import TrainConfig
    from proma.rl.build import build_run

    quiet = log or (lambda *a, **k: None)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.from_preset("smoke", **{**REAL_POLICY, **overrides, "seed": seed, "out": tmp,
                                                  "cache_dir": str(cache_dir or warmstart_cache())})
        s = build_run(cfg, log=quiet)
    step, batches, ws = pick_minibatch(s)
    quiet(f"real case: rollout step {step}, {sum(bool(np.any(w)) for w in ws)}/{len(ws)} microbatches "
          "with non-zero weights")
    return s, step, batches, ws


def real_cases(*, seed: int = 0, cache_dir=None, log=print) -> list:
    """The real Qwen3 / GSM8K cases (one per setting of :data:`REAL_SETTINGS`), expected from the reference."""
    from proma.rl.losses import completion_logprobs

    s, step, batches, weights = real_rollout(seed=seed, cache_dir=cache_dir, log=log)
    model = copy.deepcopy(s.model).double()
    layers, arrays = capture_case_arrays(model, completion_logprobs, batches, weights)
    bounds = [0] + np.cumsum([len(w) for w in weights]).tolist()
    n_params = sum(layer.size for layer in layers)
    cases = []
    for case_id, what, settings in REAL_SETTINGS:
        description = (f"{what} on a real GSM8K-calc minibatch (rollout step {step}, seed {seed}) of a "
                       f"{len(layers)}-tensor, {n_params:,}-parameter Qwen3 policy with tied embeddings")
        case = Case(id=case_id, description=description, settings=settings, layers=list(layers),
                    boundaries=bounds, arrays=dict(arrays), tags=["real", "tied", "many-microbatches"])
        cases.append(compute_expected(case))
    return cases
