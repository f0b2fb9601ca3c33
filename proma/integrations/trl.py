"""PROMA inside TRL's ``GRPOTrainer``: ``PromaGRPOConfig`` and ``PromaGRPOTrainer`` (tested with trl 1.16.0).

Each microbatch (one ``training_step`` of the trainer) runs TRL's own ``_compute_loss`` on a detached copy
of the per-token log-probabilities ``lp`` (b, K), so TRL computes its loss, normalisation and metrics as
usual. The per-token coefficients ``c = d loss / d lp`` must have the form ``c[i, t] = w_i * mask[i, t]``
(a per-sequence weighted sum of log-probabilities); then

    acc.backward(seq_logp = (lp * mask).sum(-1), weights = w)

gives exactly TRL's gradient for ``proma_variant="none"``, and PROMA's projection of it otherwise. This
holds for every ``loss_type`` (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo) at
``num_iterations=1`` and ``beta=0``, where the importance ratio is exactly 1; a loss that is not of that
form raises a ValueError at the first microbatch (a safety net behind the option checks below).

Log-probabilities come from the model's own (unfused) LM head: TRL's fused head reads the tied weight
without calling ``lm_head``, a use PROMA's hooks cannot see (the accumulator's coverage check would raise).
The unfused head materialises the (b, K, vocab) logits of a microbatch in float32; in float32 it agrees with
TRL's fused head to rounding, under bf16 autocast it rounds differently (measured in docs/trl.md).

Gradient accumulation: ``zero_grad`` at the first microbatch of each optimizer step, ``synchronize`` at the
last (before clipping and ``optimizer.step()``); every forward and backward runs inside
``accelerator.no_sync`` so DDP does not reduce gradients (the accumulator does, per ``proma_sync``).

Oracle: with ``proma_oracle_dir`` set, the first optimizer step's microbatches are written as oracle cases
(``verification/FORMAT.md``) by the oracle's writer callback, found through the entry-point group
:data:`ORACLE_WRITER_GROUP` (the oracle registers ``verification.oracle.trl.OracleCaseWriter`` there; this
library never names or imports the oracle package) unless one is passed
in ``callbacks``. The trainer hands it each microbatch PROMA received and the end of each accumulation
window (``on_proma_microbatch`` / ``on_proma_step_end``).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import time
import warnings
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from ..accumulator import ProjectedAccumulator
from ..options import (ACCUMULATOR_SOLVERS, INTRA_FORMS, NO_SOLVER, STRATEGIES, SYNCS, VARIANTS, AccumulatorOptions,
                       options_from_fields)

# relative deviation (to the largest coefficient) allowed between TRL's per-token loss coefficients and
# w_i * mask: they are the same float32 expression per token, so only rounding separates them
WEIGHT_RTOL = 1e-4


# the accumulator's defaults: the one source of every proma_* default below
_DEFAULTS = AccumulatorOptions()
# TRL's default: one microbatch per optimizer step, where PROMA has nothing to project against
SINGLE_MICROBATCH = 1
# Entry-point group of the oracle's TRL writer, attached when proma_oracle_dir is set and no writer was passed
# in ``callbacks``: a plugin registered by the oracle (pyproject.toml), so the library depends on no oracle module.
ORACLE_WRITER_GROUP = "proma.trl_oracle_writer"
# the metrics logged per microbatch (PromaGRPOTrainer's docstring and docs/trl.md define them)
METRIC_KEYS = ("proma/removed_ratio", "proma/intra_removed_ratio", "proma/gram_rank_mean")


@dataclass
class PromaGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the options of :class:`proma.ProjectedAccumulator` (``proma_`` + its argument name).

    Every ``proma_*`` field is checked when the config is built (also through ``TrlParser``) by the
    accumulator's own validation (:class:`proma.options.AccumulatorOptions`); an error names the field.

    Raises
    ------
    ValueError naming the first invalid ``proma_*`` field and its allowed values.
    """

    proma_variant: str = field(default=_DEFAULTS.variant, metadata={
        "help": f"One of {VARIANTS}: 'proma' projects each microbatch against the accumulated gradient, "
                "'intra' within each microbatch, 'none' accumulates plainly (TRL's gradient)."})
    proma_solver: str = field(default=_DEFAULTS.solver, metadata={
        "help": f"One of {ACCUMULATOR_SOLVERS}, or a solver added with proma.solvers.add_solver."})
    proma_passes: int = field(default=_DEFAULTS.passes, metadata={"help": "Gram-Schmidt sweeps (int >= 1)."})
    proma_ridge: float = field(default=_DEFAULTS.ridge, metadata={"help": "Ridge regulariser (float > 0)."})
    proma_relative_bound: float | None = field(default=_DEFAULTS.relative_bound, metadata={
        "help": "Cap ||R|| <= bound * ||pg|| per parameter tensor (None: no cap)."})
    proma_shrinkage: float = field(default=_DEFAULTS.shrinkage, metadata={"help": "Multiplier of the removed part."})
    proma_intra_rank: int = field(default=_DEFAULTS.intra_rank, metadata={
        "help": "Intra variant: dominant directions per side (int >= 0)."})
    proma_intra_form: str = field(default=_DEFAULTS.intra_form, metadata={
        "help": f"Intra variant: one of {INTRA_FORMS}."})
    proma_strategy: str = field(default=_DEFAULTS.strategy, metadata={
        "help": f"Route of the per-layer Gram: one of {STRATEGIES}."})
    proma_exclude: list[str] = field(default_factory=list, metadata={
        "help": "Names of trainable parameters accumulated plainly."})
    proma_max_transient: int = field(default=_DEFAULTS.max_transient, metadata={
        "help": "Largest number of elements of a materialised per-sequence gradient chunk."})
    proma_sync: str = field(default=_DEFAULTS.sync, metadata={"help": f"Several processes: one of {SYNCS}."})
    proma_oracle_dir: str | None = field(default=None, metadata={
        "help": "Write the first optimizer step's microbatches as oracle cases into this directory "
                "(docs/trl.md: size, LoRA, several processes)."})
    proma_oracle_params: list[str] = field(default_factory=list, metadata={
        "help": "Oracle cases: only these parameters (names or fnmatch patterns); default every projected one."})

    def __post_init__(self):
        super().__post_init__()
        options = proma_options(self)
        if (options.variant == "proma" and options.solver != NO_SOLVER
                and self.gradient_accumulation_steps == SINGLE_MICROBATCH):
            warnings.warn("PromaGRPOConfig: gradient_accumulation_steps=1 with proma_variant='proma' leaves "
                          "nothing to project against (every optimizer step is one microbatch): PROMA changes "
                          "nothing; set gradient_accumulation_steps >= 2", UserWarning, stacklevel=3)


# every accumulator option, read from AccumulatorOptions itself (one proma_<name> field each; a test checks it)
ACCUMULATOR_OPTIONS = tuple(f.name for f in dataclasses.fields(AccumulatorOptions))


def accumulator_options(args) -> dict:
    """Keyword arguments of ``ProjectedAccumulator`` from a config (defaults for a plain ``GRPOConfig``)."""
    out = {name: getattr(args, f"proma_{name}", getattr(_DEFAULTS, name)) for name in ACCUMULATOR_OPTIONS}
    exclude = out["exclude"] or ()
    out["exclude"] = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    return out


def proma_options(args) -> AccumulatorOptions:
    """The config's ``proma_*`` fields checked by :class:`AccumulatorOptions`; ValueError names the field
    (:func:`proma.options.options_from_fields`)."""
    return options_from_fields(accumulator_options(args), "proma_")


def check_supported(args) -> None:
    """ValueError for a TRL option whose gradient is not a per-sequence weighted sum of log-probabilities."""
    rejected = [
        (args.beta != 0.0, f"beta={args.beta} (KL to a reference model); use beta=0"),
        (args.num_iterations != 1, f"num_iterations={args.num_iterations} (clipped ratios after the first "
                                   "iteration); use num_iterations=1"),
        (args.steps_per_generation is not None and args.steps_per_generation > args.gradient_accumulation_steps,
         f"steps_per_generation={args.steps_per_generation} > gradient_accumulation_steps="
         f"{args.gradient_accumulation_steps} (completions scored by an older policy: clipped ratios)"),
        (args.use_vllm, "use_vllm=True (importance-sampling correction of the sampler's log-probabilities)"),
        (args.use_liger_kernel, "use_liger_kernel=True (kernels PROMA's hooks cannot see through)"),
        (args.fp16, "fp16=True (loss scaling); use bf16 or float32"),
        (args.top_entropy_quantile < 1.0, f"top_entropy_quantile={args.top_entropy_quantile} (a per-token mask)"),
        (args.entropy_coef != 0.0 or args.use_adaptive_entropy, "an entropy bonus (entropy_coef / "
                                                                "use_adaptive_entropy): not a log-probability term"),
    ]
    bad = [why for cond, why in rejected if cond]
    if bad:
        raise ValueError("PromaGRPOTrainer does not support " + "; ".join(bad))


def sequence_weights(coef: torch.Tensor, mask: torch.Tensor, *, rtol: float = WEIGHT_RTOL) -> torch.Tensor:
    """Per-sequence weights ``w`` (b,) float64 with ``coef[i, t] = w_i * mask[i, t]``, or ValueError.

    ``coef`` (b, K): d loss / d log p of each completion token; ``mask`` (b, K): the tokens the loss scores.
    """
    c, m = coef.detach().double(), mask.detach().double()
    w = (c * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    worst = float((c - w[:, None] * m).abs().max()) if c.numel() else 0.0
    scale = float(c.abs().max()) if c.numel() else 0.0
    if worst > rtol * scale:
        raise ValueError(f"TRL's loss is not a per-sequence weighted sum of log-probabilities (per-token "
                         f"coefficients deviate by {worst:.3g} from w_i * mask, scale {scale:.3g}); PROMA needs "
                         "beta=0, num_iterations=1 and no per-token weighting")
    return w


def attach_oracle_writer(trainer, group: str = ORACLE_WRITER_GROUP):
    """The oracle writer registered in the entry-point ``group``, built on ``proma_oracle_dir``, added as a callback.

    A plugin, not an import: ``proma`` does not depend on the oracle package, which registers its writer there.
    """
    found = sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name)
    if not found:
        raise ValueError(f"proma_oracle_dir needs an oracle writer registered in the entry-point group {group!r} "
                         "(the verification package installed with proma registers one); none is installed")
    try:
        writer_cls = found[0].load()
    except (ImportError, AttributeError) as e:
        raise ValueError(f"proma_oracle_dir: the oracle writer {found[0].value!r} could not be loaded: {e}") from e
    writer = writer_cls(trainer.args.proma_oracle_dir, params=tuple(getattr(trainer.args, "proma_oracle_params", ())))
    trainer.add_callback(writer)
    return writer


class PromaGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose microbatch gradients are accumulated by :class:`proma.ProjectedAccumulator`.

    Takes the arguments of ``GRPOTrainer``; ``args`` is a :class:`PromaGRPOConfig` (a plain ``GRPOConfig``
    gets the accumulator's defaults). The accumulator is built with the trainer, so options that do not fit
    the model (``proma_exclude`` naming no trainable parameter, a parameter without a rule) fail here, before
    any rollout. Metrics (docs/trl.md):

    - ``proma/removed_ratio`` (variant "proma"): ||R|| / ||pg|| of microbatches 2..M of each optimizer step
      (the first has nothing to project against), each the mean over ranks;
    - ``proma/intra_removed_ratio`` (variant "intra"): the part removed within each microbatch 1..M, mean
      over ranks;
    - ``proma/gram_rank_mean``: rank of the per-parameter Gram, mean over the parameters that had one.

    Oracle hooks: a callback with ``on_proma_microbatch(trainer, record)`` and ``on_proma_step_end(trainer)``
    (the oracle's writer, ``verification.oracle.trl``) gets every microbatch PROMA received and the end of
    each accumulation window; with ``proma_oracle_dir`` set and no such callback, one is attached by name.
    """

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:
            check_supported(config)
        super().__init__(*args, **kwargs)
        check_supported(self.args)
        self.proma_options = proma_options(self.args).as_kwargs()
        self._proma_acc = None
        self._proma_window_open = False
        try:
            self.accumulator   # noqa: B018 (built now: options that do not fit the model fail before a rollout)
        except ValueError as e:
            raise ValueError(f"PromaGRPOTrainer: the proma_* options do not fit the model "
                             f"(proma_exclude={list(self.proma_options['exclude'])}): {e}") from e
        # accelerator.prepare (FSDP2: fully_shard) replaces the parameters later: rebuilt at the first microbatch
        self._proma_acc.close()
        self._proma_acc = None
        if getattr(self.args, "proma_oracle_dir", None) and not self._oracle_hooks():
            attach_oracle_writer(self)

    @property
    def accumulator(self) -> ProjectedAccumulator:
        """The accumulator, on the unwrapped policy."""
        if self._proma_acc is None:
            self._proma_acc = ProjectedAccumulator(self.accelerator.unwrap_model(self.model), **self.proma_options)
        return self._proma_acc

    def _oracle_hooks(self) -> list:
        return [cb for cb in self.callback_handler.callbacks if hasattr(cb, "on_proma_microbatch")]

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's per-token log-probabilities and entropies (b, K), through the model's unfused LM head."""
        extra = sorted(k for k, v in multimodal.items() if v is not None)
        if extra or compute_aux_loss:
            raise ValueError(f"PromaGRPOTrainer supports text-only models without router aux loss; got "
                             f"{extra + (['compute_aux_loss'] if compute_aux_loss else [])}")
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, am = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            with self.accelerator.autocast():
                logits = model(input_ids=ids, attention_mask=am, logits_to_keep=logits_to_keep + 1,
                               use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1].float() / self.temperature, dim=-1)
            logps.append(logp.gather(-1, ids[:, -logits_to_keep:, None]).squeeze(-1))
            if compute_entropy:
                entropies.append(-(logp.exp() * logp).sum(-1).detach())
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One microbatch: TRL's inputs and loss, PROMA's backward (mirrors Trainer/GRPOTrainer.training_step)."""
        started = time.perf_counter()
        model.train()
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        acc = self.accumulator
        if not self._proma_window_open:   # first microbatch of an optimizer step
            acc.zero_grad()
            self._proma_window_open = True
        with self.compute_loss_context_manager(), self.accelerator.no_sync(model):
            loss = self._proma_microbatch(model, inputs, acc)
        if self.accelerator.sync_gradients:   # last microbatch: before clipping and optimizer.step()
            acc.synchronize()
            self._proma_window_open = False
            for hook in self._oracle_hooks():
                hook.on_proma_step_end(self)
        self._step += 1
        self._current_train_step_time += time.perf_counter() - started
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
        return loss.detach()

    def _proma_microbatch(self, model, inputs, acc) -> torch.Tensor:
        """TRL's loss on detached log-probabilities -> per-sequence weights -> ``acc.backward``."""
        seen = {}
        forward = self._get_per_token_logps_and_entropies

        def detached(*args, **kwargs):
            logps, entropies, aux = forward(*args, **kwargs)
            seen["logps"], seen["leaf"] = logps, logps.detach().requires_grad_(True)
            return seen["leaf"], entropies, aux

        self._get_per_token_logps_and_entropies = detached   # instance attribute: TRL's _compute_loss calls it
        try:
            loss = self._compute_loss(model, inputs)
        finally:
            del self._get_per_token_logps_and_entropies
        (coef,) = torch.autograd.grad(loss, seen["leaf"], allow_unused=True, materialize_grads=True)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        w = sequence_weights(coef, mask)
        seq_logp = (seen["logps"] * mask.to(seen["logps"].dtype)).sum(-1)
        acc.backward(seq_logp, w)
        hooks = self._oracle_hooks()
        if hooks:
            record = {"input_ids": torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                      "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
                      "loss_mask": mask, "logits_to_keep": inputs["completion_ids"].size(1), "weights": w}
            for hook in hooks:
                hook.on_proma_microbatch(self, record)
        self._log_proma_stats(acc)
        return loss

    def _log_proma_stats(self, acc) -> None:
        """Append this microbatch's PROMA metrics (each value the mean over ranks; see the class docstring)."""
        if acc.options.variant == "none":
            return
        stats = acc.stats()
        summary, nan = stats["summary"], float("nan")
        ranks = [d["gram_rank"] for d in stats["params"].values() if d.get("gram_rank") is not None]
        intra = acc.options.variant == "intra"
        # the first microbatch of a window has nothing to project against: its 0 is not a measurement
        projected = not intra and summary["microbatches"] >= 2
        values = [summary["removed_ratio"] if projected else nan, summary["removed_ratio"] if intra else nan,
                  sum(ranks) / len(ranks) if ranks else nan]
        for key, value in zip(METRIC_KEYS, self._mean_over_ranks(values)):
            if not math.isnan(value):
                self._metrics["train"][key].append(value)

    def _mean_over_ranks(self, values: list) -> list:
        """Each of ``values`` averaged over the ranks that have it (NaN: absent); the same list on one rank."""
        if self.accelerator.num_processes == 1:
            return values
        local = torch.tensor([values], dtype=torch.float64, device=self.accelerator.device)
        return [float(v) for v in self.accelerator.gather(local).nanmean(0)]
