"""PROMA inside verl 0.7's ``DataParallelPPOActor``: ``PromaActorConfig`` and ``PromaDataParallelPPOActor``.

Tested with ``verl==0.7.1`` (the ``update_policy`` API; verl 0.9 replaced it by engines, see
:mod:`proma.integrations.verl_engine`). verl's own ``update_policy`` runs unchanged: its mini-batch and
micro-batch loop, its policy loss (every ``loss_agg_mode``), its loss scale (``1 / gradient_accumulation``, or
the dynamic batch share), its metrics and its optimizer step. Two methods are overridden:

- ``_forward_micro_batch`` (with gradients enabled, i.e. inside ``update_policy``) returns the per-token
  log-probabilities ``lp`` (b, K) as a *detached leaf* with a gradient hook. verl's ``loss.backward()`` then
  only reaches that leaf, and the hook receives the per-token coefficients ``c = d loss / d lp`` (b, K). When
  they have the form ``c[i, t] = w_i * response_mask[i, t]`` (a per-sequence weighted sum of log-probabilities),

      acc.backward(seq_logp = (lp * response_mask).sum(-1), weights = w)

  runs inside the hook (a nested backward through the model's real graph) and gives exactly verl's gradient
  for ``proma_variant="none"``, and PROMA's projection of it otherwise. A loss of any other form raises a
  ValueError at its first microbatch (the safety net behind the checks below). The first microbatch of each
  mini-batch starts the accumulation (``acc.zero_grad``);
- ``_optimizer_step`` calls ``acc.synchronize()`` (average over ranks, FSDP2 shards) before verl's clipping
  and ``optimizer.step()``.

What PROMA needs, and what is refused (ValueError at construction, or in ``update_policy`` for what only the
batch tells), since the loss must be linear in the sequence log-probabilities:

- one PPO epoch and one mini-batch per step (``ppo_epochs == 1``, ``ppo_mini_batch_size`` = the batch): with
  more, every optimizer step after the first scores completions with a moved policy, the ratio leaves 1 and
  clipping makes the per-token coefficients depend on the token;
- no entropy bonus (``entropy_coeff == 0``: its gradient is not a log-probability term; ``calculate_entropy``
  as a metric is fine);
- a KL loss only with ``kl_loss_type`` "kl" / "k1" (linear in ``lp``); "low_var_kl", "mse", "abs", "full" are not;
- no float16 (loss scaling), fused kernels (the LM head hidden from PROMA's hooks), Ulysses sequence
  parallelism or the prefix grouper (activations not indexed by sequence).

Remove padding (``use_remove_padding=True``): the packed forward puts every token of the microbatch in one row
(dim 0 = 1), while PROMA's capture indexes sequences by dim 0. Where PROMA's hooks are active (every variant
but "none" without FSDP2) the training forward of this actor therefore runs verl's padded path on the same
microbatch (the same log-probabilities, the attention mask in place of the packing); verl's ``compute_log_prob``
keeps the packed path. Gradient checkpointing: non-reentrant (verl's default) and reentrant both work.

FSDP2 (verl's ``strategy=fsdp2``): the accumulator is built on the sharded module (:mod:`proma.fsdp`); its
``synchronize`` writes every ``p.grad`` as a sharded DTensor before verl's ``fsdp2_clip_grad_norm_``. FSDP1
(``strategy=fsdp``) is not supported by the accumulator (flat parameters) and is refused.

Using it in verl's trainer: set the actor config's ``_target_`` to ``proma.integrations.verl.PromaActorConfig``
(with ``proma_*`` keys) and call :func:`use_in_verl_workers` in the worker process before ``init_model`` (it
points verl's ``verl.workers.actor.DataParallelPPOActor`` at this class; the reference policy, built without an
optimizer, stays plain). docs/verl.md has the details.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from verl.workers.actor.dp_actor import DataParallelPPOActor
from verl.workers.config import FSDPActorConfig

from ..accumulator import ProjectedAccumulator
from .verl_common import (_DEFAULTS, ACCUMULATOR_OPTIONS, LINEAR_KL, WEIGHT_RTOL, accumulator_options,  # noqa: F401
                          proma_options, sequence_weights)

METRIC_KEYS = ("proma/removed_ratio", "proma/intra_removed_ratio", "proma/gram_rank_mean")


@dataclass
class PromaActorConfig(FSDPActorConfig):
    """verl's ``FSDPActorConfig`` plus the options of :class:`proma.ProjectedAccumulator` (``proma_`` + name).

    Every ``proma_*`` field is checked when the config is built by the accumulator's own validation
    (:class:`proma.options.AccumulatorOptions`); an error names the field. ``proma_exclude`` is a list of
    parameter names accumulated plainly.
    """

    proma_variant: str = _DEFAULTS.variant
    proma_solver: str = _DEFAULTS.solver
    proma_passes: int = _DEFAULTS.passes
    proma_ridge: float = _DEFAULTS.ridge
    proma_relative_bound: float | None = _DEFAULTS.relative_bound
    proma_shrinkage: float = _DEFAULTS.shrinkage
    proma_intra_rank: int = _DEFAULTS.intra_rank
    proma_intra_form: str = _DEFAULTS.intra_form
    proma_strategy: str = _DEFAULTS.strategy
    proma_exclude: list = field(default_factory=list)
    proma_sync: str = _DEFAULTS.sync

    def __post_init__(self):
        super().__post_init__()
        proma_options(self)


def check_supported(config, param_dtype: torch.dtype) -> None:
    """ValueError for a verl actor option whose gradient is not a per-sequence weighted sum of log-probabilities."""
    get = config.get
    kl_type = get("kl_loss_type", "low_var_kl")
    rejected = [
        (get("ppo_epochs", 1) != 1, f"ppo_epochs={get('ppo_epochs')} (after the first epoch the ratio leaves 1 "
                                    "and clipping is active); use ppo_epochs=1"),
        (get("entropy_coeff", 0) != 0, f"entropy_coeff={get('entropy_coeff')} (an entropy bonus is not a "
                                       "log-probability term); use entropy_coeff=0"),
        (bool(get("use_kl_loss", False)) and kl_type not in LINEAR_KL,
         f"use_kl_loss with kl_loss_type={kl_type!r} (not linear in the log-probabilities); use one of "
         f"{LINEAR_KL} or use_kl_loss=False (a KL penalty in the reward is fine)"),
        (param_dtype == torch.float16, "fsdp_config.dtype=float16 (loss scaling); use bfloat16 or float32"),
        (bool(get("use_fused_kernels", False)), "use_fused_kernels=True (a fused LM head PROMA's hooks cannot see)"),
        (get("ulysses_sequence_parallel_size", 1) > 1,
         f"ulysses_sequence_parallel_size={get('ulysses_sequence_parallel_size')} (activations split along tokens)"),
        (bool(get("use_prefix_grouper", False)), "use_prefix_grouper=True (shared prefixes: activations not "
                                                  "indexed by sequence)"),
        (get("strategy", "fsdp") == "megatron", "strategy=megatron"),
    ]
    bad = [why for cond, why in rejected if cond]
    if bad:
        raise ValueError("PromaDataParallelPPOActor does not support " + "; ".join(bad))


def _is_fsdp1(module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel
    return isinstance(module, FullyShardedDataParallel)


class PromaDataParallelPPOActor(DataParallelPPOActor):
    """verl's ``DataParallelPPOActor`` whose micro-batch gradients go through :class:`proma.ProjectedAccumulator`.

    Parameters are verl's (``config``, ``actor_module``, ``actor_optimizer``); ``config`` is a
    :class:`PromaActorConfig` (or any actor config: absent ``proma_*`` keys take the accumulator's defaults).
    Without an optimizer (verl's reference policy) it is plain verl. The accumulator is built on
    ``actor_module`` here, so options that do not fit the model fail at construction.

    Metrics added to ``update_policy``'s: ``proma/removed_ratio`` (variant "proma", microbatches 2..M of each
    step), ``proma/intra_removed_ratio`` (variant "intra") and ``proma/gram_rank_mean`` (docs/verl.md).
    """

    def __init__(self, config, actor_module, actor_optimizer=None):
        super().__init__(config, actor_module, actor_optimizer)
        self.proma_options = proma_options(config)
        self._acc = None
        self._window_open = False
        self._proma_metrics: dict = {}
        self._padded_note = False
        if actor_optimizer is None:
            return
        check_supported(config, self.param_dtype)
        if _is_fsdp1(actor_module):
            raise ValueError("PromaDataParallelPPOActor does not support strategy=fsdp (FSDP1 flat parameters); "
                             "use strategy=fsdp2 or no FSDP")
        try:
            self._acc = ProjectedAccumulator(actor_module, options=self.proma_options)
        except ValueError as e:
            raise ValueError(f"PromaDataParallelPPOActor: the proma_* options do not fit the model "
                             f"(proma_exclude={sorted(self.proma_options.exclude)}): {e}") from e

    @property
    def accumulator(self) -> ProjectedAccumulator | None:
        """The accumulator (None for an actor without optimizer)."""
        return self._acc

    # -- verl's entry points -------------------------------------------------------------------------
    def update_policy(self, data):
        """verl's ``update_policy``; refuses several mini-batches per step; adds the ``proma/*`` metrics."""
        if self._acc is not None:
            n, mini = len(data), self.config.ppo_mini_batch_size
            if n > mini:
                raise ValueError(f"PromaDataParallelPPOActor: the batch of {n} sequences splits into "
                                 f"{math.ceil(n / mini)} mini-batches of ppo_mini_batch_size={mini}: every optimizer "
                                 "step after the first scores the batch with a moved policy (ratio away from 1, "
                                 "clipping active), which is not a weighted sum of log-probabilities; set "
                                 "ppo_mini_batch_size to the batch size per GPU")
        self._proma_metrics = {}
        self._window_open = False
        metrics = super().update_policy(data)
        for key, values in self._proma_metrics.items():
            metrics[key] = values
        return metrics

    def _forward_micro_batch(self, micro_batch, temperature, calculate_entropy=False):
        acc = self._acc
        if acc is None or not torch.is_grad_enabled():
            return super()._forward_micro_batch(micro_batch, temperature, calculate_entropy)
        if not self._window_open:   # first microbatch of a mini-batch (verl zeroed its optimizer's grads)
            acc.zero_grad()
            self._window_open = True
        outputs = self._hooked_forward(micro_batch, temperature, calculate_entropy)
        lp = outputs["log_probs"]
        mask = micro_batch["response_mask"]
        seq_logp = (lp * mask.to(lp.dtype)).sum(-1)
        leaf = lp.detach().requires_grad_(True)

        def on_coefficients(coef):
            # runs inside verl's loss.backward(), where autograd has switched gradient mode off
            w = sequence_weights(coef, mask)
            with torch.enable_grad():
                acc.backward(seq_logp, w)
            self._record_stats()
            return None

        leaf.register_hook(on_coefficients)
        return dict(outputs, log_probs=leaf)

    def _hooked_forward(self, micro_batch, temperature, calculate_entropy):
        """verl's forward; the padded path where PROMA's hooks need dim 0 to index sequences (module docstring)."""
        if not (self.use_remove_padding and self._acc._hooked):
            return super()._forward_micro_batch(micro_batch, temperature, calculate_entropy)
        if not self._padded_note:
            warnings.warn("PromaDataParallelPPOActor: use_remove_padding=True; the training forward runs verl's "
                          "padded path (PROMA's hooks index sequences by dim 0, the packed path has one row)",
                          UserWarning, stacklevel=3)
            self._padded_note = True
        self.use_remove_padding = False
        try:
            return super()._forward_micro_batch(micro_batch, temperature, calculate_entropy)
        finally:
            self.use_remove_padding = True

    def _optimizer_step(self):
        if self._acc is not None:
            self._acc.synchronize()
            self._window_open = False
        return super()._optimizer_step()

    # -- metrics -------------------------------------------------------------------------------------
    def _record_stats(self) -> None:
        """This microbatch's PROMA metrics (local to the rank; see the class docstring)."""
        acc = self._acc
        if acc.options.variant == "none":
            return
        stats = acc.stats()
        summary = stats["summary"]
        ranks = [d["gram_rank"] for d in stats["params"].values() if d.get("gram_rank") is not None]
        intra = acc.options.variant == "intra"
        if intra:
            self._proma_metrics.setdefault(METRIC_KEYS[1], []).append(summary["removed_ratio"])
        elif summary["microbatches"] >= 2:   # the first microbatch has nothing to project against
            self._proma_metrics.setdefault(METRIC_KEYS[0], []).append(summary["removed_ratio"])
        if ranks:
            self._proma_metrics.setdefault(METRIC_KEYS[2], []).append(sum(ranks) / len(ranks))


def use_in_verl_workers() -> None:
    """Make verl's FSDP workers build :class:`PromaDataParallelPPOActor` for the actor.

    verl 0.7's ``ActorRolloutRefWorker.init_model`` imports ``DataParallelPPOActor`` from
    ``verl.workers.actor`` when it runs; this points that name at the PROMA actor (the reference policy, built
    without an optimizer, behaves as verl's). Call it in each worker process (e.g. from a module listed in
    ``VERL_USE_EXTERNAL_MODULES``) before the workers build their models.
    """
    import verl.workers.actor as actor_pkg

    actor_pkg.DataParallelPPOActor = PromaDataParallelPPOActor


__all__ = ["PromaActorConfig", "PromaDataParallelPPOActor", "proma_options", "accumulator_options",
           "check_supported", "sequence_weights", "use_in_verl_workers"]
