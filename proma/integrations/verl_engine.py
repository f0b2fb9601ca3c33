"""PROMA in verl 0.9's engine API: a loss-function wrapper and an FSDP engine subclass (tested with ``verl==0.9.1``).

verl 0.9 trains through ``FSDPEngine.forward_backward_batch(data, loss_function)``: per micro-batch
``forward_step`` runs the model, builds ``model_output`` (``log_probs`` as a flat (total_nnz,) or nested tensor
over every token of the micro-batch) and calls ``loss_function(model_output, data, dp_group)`` (by default
``verl.workers.utils.losses.ppo_loss``); ``forward_backward_batch`` then calls ``loss.backward()``, and
``optimizer_zero_grad`` / ``optimizer_step`` frame the mini-batch. The extension points used here:

- :func:`proma_loss_function` wraps any such loss function. It runs the loss on a detached copy of the
  log-probabilities, reads the per-token coefficients ``c = d loss / d log p``, checks ``c = w_i * response_mask``
  on each response (the same check as :mod:`proma.integrations.verl`), calls ``acc.backward(seq_logp, w)`` with
  the real, differentiable log-probabilities right away, and returns the loss detached from the model (its
  ``backward()`` in verl's loop then changes no parameter gradient). An entropy term with a gradient raises.
- :class:`PromaFSDPEngineWithLMHead` (a subclass of verl's ``FSDPEngineWithLMHead``) wraps the loss function in
  ``forward_step``, starts the accumulation in ``optimizer_zero_grad`` and calls ``acc.synchronize()`` at the
  start of ``optimizer_step``. :func:`register_engine` registers it in verl's ``EngineRegistry`` under the
  vendor ``"proma"``, which verl selects with ``VERL_ENGINE_VENDOR=proma``. verl 0.9 hands the engine no actor
  config to read ``proma_*`` keys from, so the options come, like the vendor, from the worker's environment:
  ``PROMA_VERL_OPTIONS``, a JSON object of :class:`~proma.options.AccumulatorOptions` fields
  (:func:`options_from_env`; e.g. ``{"variant": "proma", "solver": "exact"}``), or from the attribute
  :attr:`PromaFSDPEngineWithLMHead.proma_options` set in code (not both).

Remove padding: verl 0.9's packed path (``use_remove_padding=True``, its default) runs the model on one row
(dim 0 = 1), which PROMA's capture cannot split into sequences; the engine refuses it while PROMA's hooks are
active. With ``use_remove_padding=False`` verl pads each micro-batch to (b, max_len) and PROMA works.

Where it runs: verl 0.9.1 registers its FSDP engines for ``device=["cuda", "npu"]``; :func:`register_engine`
registers this one for ``"cpu"`` too. On a CPU-only machine verl also needs a platform whose device is the CPU
(verl's default CUDA platform asks ``torch.cuda``); the tests set one, and build this engine through verl's
``EngineRegistry``, ``initialize()`` (verl's model loading, FSDP2 wrapping, optimizer) and verl's
``ActorRolloutRefWorker`` in one and two processes (docs/verl.md, "verl 0.9.1 on CPU").
"""
from __future__ import annotations

import json
import os

import torch
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.utils.padding import no_padding_2_padding

from ..accumulator import ProjectedAccumulator
from ..options import AccumulatorOptions, options_from_fields
from .verl_common import ACCUMULATOR_OPTIONS, sequence_weights

ENGINE_VENDOR = "proma"
# the environment variable that carries the engine's options into verl's worker processes
OPTIONS_ENV = "PROMA_VERL_OPTIONS"


def options_from_env(environ=None) -> AccumulatorOptions | None:
    """The engine's options from ``PROMA_VERL_OPTIONS`` (None when unset); ValueError names the key at fault.

    The value is a JSON object of :class:`~proma.options.AccumulatorOptions` fields, the others at their
    defaults, e.g. ``{"variant": "proma", "solver": "gram_schmidt", "passes": 2, "relative_bound": 0.5}``.
    """
    raw = (os.environ if environ is None else environ).get(OPTIONS_ENV)
    if raw is None:
        return None
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{OPTIONS_ENV}={raw!r} is not JSON: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{OPTIONS_ENV}={raw!r} must be a JSON object of option: value")
    unknown = sorted(set(values) - set(ACCUMULATOR_OPTIONS))
    if unknown:
        raise ValueError(f"{OPTIONS_ENV} has unknown keys {unknown}; known: {', '.join(ACCUMULATOR_OPTIONS)}")
    return options_from_fields(values, f"{OPTIONS_ENV}.")


def _padded_mask(data) -> torch.Tensor:
    """The micro-batch's response mask (b, K) as verl's ``ppo_loss`` reads it."""
    mask = data["response_mask"]
    if getattr(mask, "is_nested", False):
        mask = data.select("response_mask").to_padded_tensor()["response_mask"]
    return mask


def proma_loss_function(loss_function, accumulator):
    """``loss_function(model_output, data, dp_group)`` whose gradient goes through PROMA.

    ``accumulator``: a :class:`ProjectedAccumulator` or a callable returning one (built lazily on the engine's
    module). Returns ``(loss detached from the model, metrics)``; the microbatch's PROMA backward has run.
    """

    def wrapped(model_output, data, dp_group=None):
        acc = accumulator() if callable(accumulator) else accumulator
        lp = model_output["log_probs"]
        flat = lp.values() if lp.is_nested else lp
        leaf = flat.detach().requires_grad_(True)
        inputs = dict(model_output, log_probs=leaf)
        entropy = model_output.get("entropy")
        leaves = [leaf]
        if entropy is not None and entropy.requires_grad:
            ent = (entropy.values() if entropy.is_nested else entropy).detach().requires_grad_(True)
            inputs["entropy"] = ent
            leaves.append(ent)
        loss, metrics = loss_function(model_output=inputs, data=data, dp_group=dp_group)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        if len(grads) > 1 and bool(grads[1].ne(0).any()):
            raise ValueError("PROMA in verl's engine: the loss has an entropy term (entropy_coeff != 0), which is "
                             "not a log-probability term; set entropy_coeff=0")
        mask = _padded_mask(data)
        coef = no_padding_2_padding(grads[0], data)
        w = sequence_weights(coef, mask)
        seq_logp = (no_padding_2_padding(flat, data) * mask.to(flat.dtype)).sum(-1)
        acc.backward(seq_logp, w)
        return loss.detach().requires_grad_(True), metrics

    return wrapped


class PromaFSDPEngineWithLMHead(FSDPEngineWithLMHead):
    """verl 0.9's FSDP language-model engine with PROMA's accumulation (module docstring)."""

    proma_options: AccumulatorOptions = AccumulatorOptions()
    _proma_acc = None

    @property
    def accumulator(self) -> ProjectedAccumulator:
        """The accumulator on the engine's (wrapped) module, built at first use, with the options of
        ``PROMA_VERL_OPTIONS`` or of :attr:`proma_options`."""
        if self._proma_acc is None:
            options, from_env = self.proma_options, options_from_env()
            if from_env is not None:
                if options != AccumulatorOptions():
                    raise ValueError(f"PROMA's engine options are set twice: {OPTIONS_ENV} and proma_options="
                                     f"{options!r}; set one")
                options = from_env
            self._proma_acc = ProjectedAccumulator(self.module, options=options)
        return self._proma_acc

    def forward_step(self, micro_batch, loss_function, forward_only):
        if forward_only or loss_function is None:
            return super().forward_step(micro_batch, loss_function, forward_only)
        from verl.utils import tensordict_utils as tu

        if tu.get_non_tensor_data(data=micro_batch, key="use_remove_padding", default=True):
            raise ValueError("PROMA in verl's engine needs use_remove_padding=False: the packed forward puts every "
                             "token in one row, and PROMA's capture indexes sequences by dim 0")
        return super().forward_step(micro_batch, proma_loss_function(loss_function, lambda: self.accumulator),
                                    forward_only)

    def optimizer_zero_grad(self):
        super().optimizer_zero_grad()
        self.accumulator.zero_grad()

    def optimizer_step(self):
        self.accumulator.synchronize()
        return super().optimizer_step()


def register_engine(devices=("cuda", "npu", "cpu")) -> None:
    """Register :class:`PromaFSDPEngineWithLMHead` for verl's language models under the vendor ``"proma"``
    (select it with ``VERL_ENGINE_VENDOR=proma``)."""
    from verl.workers.engine.base import EngineRegistry

    EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device=list(devices),
                            vendor=ENGINE_VENDOR)(PromaFSDPEngineWithLMHead)


__all__ = ["proma_loss_function", "PromaFSDPEngineWithLMHead", "register_engine", "options_from_env", "ENGINE_VENDOR",
           "OPTIONS_ENV"]
