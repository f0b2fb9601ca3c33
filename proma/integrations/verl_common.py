"""What PROMA's verl integrations share across verl versions: the ``proma_*`` option keys and their check, and the
per-sequence weights read off verl's per-token loss coefficients. Imports nothing from verl."""
from __future__ import annotations

import torch

from ..options import AccumulatorOptions, options_from_fields

# relative deviation (to the largest coefficient) allowed between verl's per-token loss coefficients and
# w_i * mask: the same float32 expression per token, so only rounding separates them
WEIGHT_RTOL = 1e-4
# the accumulator's defaults: the one source of every proma_* default below
_DEFAULTS = AccumulatorOptions()
ACCUMULATOR_OPTIONS = ("variant", "solver", "passes", "ridge", "relative_bound", "shrinkage", "intra_rank",
                       "intra_form", "strategy", "exclude", "sync")
# KL penalties whose per-token gradient in the log-probability is constant (k1: logp - ref_logp)
LINEAR_KL = ("kl", "k1")


def accumulator_options(config) -> dict:
    """Keyword arguments of ``ProjectedAccumulator`` from a verl actor config (dataclass, DictConfig or dict);
    absent keys take the accumulator's defaults."""
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    out = {name: get(f"proma_{name}", getattr(_DEFAULTS, name)) for name in ACCUMULATOR_OPTIONS}
    exclude = out["exclude"] if out["exclude"] is not None else ()
    out["exclude"] = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    return out


def proma_options(config) -> AccumulatorOptions:
    """The config's ``proma_*`` keys checked by :class:`AccumulatorOptions`; ValueError names the key
    (:func:`proma.options.options_from_fields`)."""
    return options_from_fields(accumulator_options(config), "actor.proma_")


def sequence_weights(coef: torch.Tensor, mask: torch.Tensor, *, rtol: float = WEIGHT_RTOL) -> torch.Tensor:
    """Per-sequence weights ``w`` (b,) float64 with ``coef[i, t] = w_i * mask[i, t]``, or ValueError.

    ``coef`` (b, K): d loss / d log p of each response token; ``mask`` (b, K): the tokens the loss scores.
    """
    c, m = coef.detach().double(), mask.detach().double()
    w = (c * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    worst = float((c - w[:, None] * m).abs().max()) if c.numel() else 0.0
    scale = float(c.abs().max()) if c.numel() else 0.0
    if worst > rtol * scale:
        raise ValueError(f"verl's actor loss is not a per-sequence weighted sum of log-probabilities (per-token "
                         f"coefficients deviate by {worst:.3g} from w_i * response_mask, scale {scale:.3g}): PROMA "
                         "needs the ratio at 1 (one epoch, one mini-batch), no entropy bonus, a linear KL loss and "
                         "a policy loss whose token coefficients depend on the sequence only")
    return w
