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
The unfused head materialises the (b, K, vocab) logits of a microbatch in float32.

Gradient accumulation: ``zero_grad`` at the first microbatch of each optimizer step, ``synchronize`` at the
last (before clipping and ``optimizer.step()``); every forward and backward runs inside
``accelerator.no_sync`` so DDP does not reduce gradients (the accumulator does, per ``proma_sync``).

Oracle: with ``proma_oracle_dir`` set, the first optimizer step's microbatches are written as oracle cases
(``verification/FORMAT.md``) from a float64 copy of the policy, the weights being the ones PROMA received.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from ..accumulator import ProjectedAccumulator

# relative deviation (to the largest coefficient) allowed between TRL's per-token loss coefficients and
# w_i * mask: they are the same float32 expression per token, so only rounding separates them
WEIGHT_RTOL = 1e-4


@dataclass
class PromaGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the options of :class:`proma.ProjectedAccumulator` (``proma_`` + its argument name)."""

    proma_variant: str = field(default="proma", metadata={"help": "'proma', 'intra' or 'none' (plain accumulation)."})
    proma_solver: str = field(default="exact", metadata={"help": "'exact', 'gram_schmidt' or 'ridge'."})
    proma_passes: int = field(default=2, metadata={"help": "Gram-Schmidt sweeps."})
    proma_ridge: float = field(default=1e-2, metadata={"help": "Ridge regulariser."})
    proma_relative_bound: float | None = field(default=None, metadata={"help": "Cap ||R|| <= bound * ||pg||."})
    proma_shrinkage: float = field(default=1.0, metadata={"help": "Multiplier of the removed component."})
    proma_intra_rank: int = field(default=1, metadata={"help": "Intra variant: dominant directions per side."})
    proma_intra_form: str = field(default="two_sided", metadata={"help": "Intra variant: 'two_sided' or 'kron'."})
    proma_exclude: list[str] = field(default_factory=list, metadata={"help": "Parameters accumulated plainly."})
    proma_sync: str = field(default="local", metadata={"help": "Several processes: 'local' or 'global'."})
    proma_oracle_dir: str | None = field(default=None, metadata={
        "help": "Write the first optimizer step's microbatches as oracle cases into this directory."})


ACCUMULATOR_OPTIONS = ("variant", "solver", "passes", "ridge", "relative_bound", "shrinkage", "intra_rank",
                       "intra_form", "exclude", "sync")


def accumulator_options(args) -> dict:
    """Keyword arguments of ``ProjectedAccumulator`` from a config (defaults for a plain ``GRPOConfig``)."""
    defaults = PromaGRPOConfig.__dataclass_fields__
    out = {}
    for name in ACCUMULATOR_OPTIONS:
        f = defaults[f"proma_{name}"]
        out[name] = getattr(args, f"proma_{name}", [] if name == "exclude" else f.default)
    out["exclude"] = tuple(out["exclude"] or ())
    return out


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


def _oracle_seq_logp(model, batch):
    """Sequence log-probabilities of an oracle microbatch from full logits (a float64 copy of the policy)."""
    k = batch["logits_to_keep"]
    out = type(model).forward(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False)
    logits = out.logits[:, -k - 1:-1] / batch["temperature"]
    lp = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, -k:, None]).squeeze(-1)
    return (lp * batch["loss_mask"]).sum(-1)


def write_oracle_cases(out_dir, model, microbatches, options: dict, temperature: float):
    """Oracle cases (FORMAT.md) of ``microbatches`` [(input_ids, attention_mask, loss_mask, K, w)] on ``model``.

    Per-sequence factors come from a float64 copy (verification's own capture, independent of proma);
    expected results from the NumPy reference. Returns the case directory.
    """
    import numpy as np

    from verification.cases import compute_expected
    from verification.format import Case, Settings, save_cases
    from verification.realcase import capture_case_arrays

    twin = copy.deepcopy(model).double()
    batches = [{"input_ids": ids, "attention_mask": am, "loss_mask": lm.double(), "logits_to_keep": k,
                "temperature": temperature} for ids, am, lm, k, _ in microbatches]
    weights = [w.double().cpu().numpy() for *_, w in microbatches]
    layers, arrays = capture_case_arrays(twin, _oracle_seq_logp, batches, weights)
    settings = Settings(**{k: options[k] for k in ("variant", "solver", "passes", "ridge", "relative_bound",
                                                   "shrinkage", "intra_rank", "intra_form")})
    case = Case(id=f"trl_grpo_{options['variant']}_{options['solver']}",
                description="first optimizer step of a TRL GRPOTrainer run (PromaGRPOTrainer)", settings=settings,
                layers=list(layers), boundaries=[0] + np.cumsum([len(w) for w in weights]).tolist(),
                arrays=arrays, tags=["real", "trl"])
    return save_cases(out_dir, [compute_expected(case)], generator={"name": "proma.integrations.trl"})


class PromaGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose microbatch gradients are accumulated by :class:`proma.ProjectedAccumulator`.

    Takes the arguments of ``GRPOTrainer``; ``args`` is a :class:`PromaGRPOConfig` (a plain ``GRPOConfig``
    gets the accumulator's defaults). PROMA's statistics of each microbatch are logged as
    ``proma/removed_ratio`` and ``proma/gram_rank_mean`` (mean over the projected parameters).
    """

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args", args[2] if len(args) > 2 else None)
        if config is not None:
            check_supported(config)
        super().__init__(*args, **kwargs)
        check_supported(self.args)
        self.proma_options = accumulator_options(self.args)
        self._proma_acc = None
        self._proma_window_open = False
        self._proma_oracle = [] if getattr(self.args, "proma_oracle_dir", None) else None

    @property
    def accumulator(self) -> ProjectedAccumulator:
        """The accumulator (built on first use, on the unwrapped policy)."""
        if self._proma_acc is None:
            self._proma_acc = ProjectedAccumulator(self.accelerator.unwrap_model(self.model), **self.proma_options)
        return self._proma_acc

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
            if self._proma_oracle:
                with acc.paused():
                    write_oracle_cases(self.args.proma_oracle_dir, self.accelerator.unwrap_model(model),
                                       self._proma_oracle, self.proma_options, self.temperature)
                self._proma_oracle = None
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
        if self._proma_oracle is not None:
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            self._proma_oracle.append((ids, am, mask, inputs["completion_ids"].size(1), w))
        self._log_proma_stats(acc)
        return loss

    def _log_proma_stats(self, acc) -> None:
        if acc.options.variant == "none":
            return
        stats = acc.stats()
        self._metrics["train"]["proma/removed_ratio"].append(stats["summary"]["removed_ratio"])
        ranks = [d["gram_rank"] for d in stats["params"].values() if d.get("gram_rank") is not None]
        if ranks:
            self._metrics["train"]["proma/gram_rank_mean"].append(sum(ranks) / len(ranks))
