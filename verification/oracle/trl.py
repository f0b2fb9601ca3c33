"""The oracle's TRL writer: oracle cases from the microbatches a ``PromaGRPOTrainer`` hands to PROMA.

A ``transformers.TrainerCallback`` that ``proma.integrations.trl.PromaGRPOTrainer`` attaches by name when
``proma_oracle_dir`` is set (the library never imports this package), or that a user passes::

    writer = OracleCaseWriter("cases/", params=["*lora_A*"])      # params: names or fnmatch patterns
    trainer = PromaGRPOTrainer(..., callbacks=[writer])

The trainer calls ``on_proma_microbatch(trainer, record)`` after each ``acc.backward`` (``record``: the
microbatch's ``input_ids`` and ``attention_mask`` (b, T), ``loss_mask`` (b, K), ``logits_to_keep`` K and
the weights ``w`` (b,) PROMA received) and ``on_proma_step_end(trainer)`` after ``acc.synchronize()``.
One optimizer step (``step``, default the first) is written as one case (FORMAT.md):

- one process: ``out_dir``;
- several processes, ``sync="local"``: rank r writes its own microbatches to ``out_dir/rank{r}`` (the case's
  expected gradient is that rank's, before the average over ranks);
- ``sync="global"``: the union microbatches (rank r's k-th microbatch, ranks in order, weights divided by
  the number of ranks W, as the accumulator forms them) as one case, written by rank 0 to ``out_dir``.

The factors come from a float64 copy of the policy with the oracle's own capture (:mod:`.capture`). The
copy runs its class's forward: instance-level ``forward`` overrides are removed from it, since TRL's fused
LM head (and accelerate's autocast wrapper) close over the original module and would run the float32
policy outside the copy (for a PEFT model: the base model, outside the adapters, giving an empty case). The
case's layers are the trainable parameters PROMA projects (the LoRA tensors for a PEFT model), minus
``proma_exclude`` (plain accumulation, not a case setting) and, with ``params``, restricted to those named.

Size: a linear use stores t (i + o + 1) numbers for t tokens, a parameter with another owner (a tied
embedding, a norm weight) b P numbers of dense per-sequence gradients, each layer 3 P expected numbers, all
float64; the estimate per microbatch is printed before the capture starts (docs/trl.md).
"""
from __future__ import annotations

import copy
import fnmatch
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from .model_case import capture_case_arrays, linear_weight_owners
from .expected import compute_expected
from .format import Case, Settings, save_cases, use_key, weights_key

BYTES_PER_NUMBER = 8   # float64 and int64 arrays
MEGABYTE = 2 ** 20
# Settings fields of a case, taken from the trainer's accumulator options
SETTING_NAMES = ("variant", "solver", "passes", "ridge", "relative_bound", "shrinkage", "intra_rank", "intra_form")


class OracleCaseWriter(TrainerCallback):
    """Writes one optimizer step of a ``PromaGRPOTrainer`` run as an oracle case into ``out_dir``.

    Parameters
    ----------
    out_dir : path of the case directory (per rank ``out_dir/rank{r}`` for several processes, sync "local").
    params : names or fnmatch patterns of the parameters to write (default: every projected parameter).
    step : which optimizer step (1 = the first).
    log : callable taking one line (default ``print``); every rank prints its size estimate.
    """

    def __init__(self, out_dir, *, params=(), step: int = 1, log=print):
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"step must be an int >= 1; got {step!r}")
        self.out_dir, self.params, self.step, self.log = Path(out_dir), tuple(params), step, log
        self.records, self.windows, self.written = [], 0, None

    @property
    def done(self) -> bool:
        return self.windows >= self.step

    def on_proma_microbatch(self, trainer, record: dict) -> None:
        """Keep one microbatch of the chosen optimizer step (tensors detached)."""
        if self.windows == self.step - 1:
            self.records.append({k: v.detach() if torch.is_tensor(v) else v for k, v in record.items()})

    def on_proma_step_end(self, trainer) -> None:
        """Capture and write the kept microbatches (a collective with several processes: every rank calls it)."""
        self.windows += 1
        if self.windows != self.step:
            return
        world, rank = trainer.accelerator.num_processes, trainer.accelerator.process_index
        options = trainer.proma_options
        with trainer.accumulator.paused():
            twin = float64_twin(trainer.accelerator.unwrap_model(trainer.model), options["exclude"], self.params)
            tag = f"rank {rank}/{world}: " if world > 1 else ""
            for line in size_lines(twin, self.records):
                self.log(f"oracle case {tag}{line}")
            batches = [dict(r, loss_mask=r["loss_mask"].double()) for r in self.records]
            weights = [r["weights"].double().cpu().numpy() for r in self.records]
            layers, arrays = capture_case_arrays(twin, seq_logp_fn(trainer.temperature), batches, weights)
        del twin
        if not any(layer.uses for layer in layers):
            raise RuntimeError("the oracle's float64 copy reached none of the case's parameters (every layer has "
                               "no use): the case would be empty")
        where = dict(rank=rank, world=world, sync=options["sync"], step=self.step)
        if world > 1 and options["sync"] == "global":
            parts = gather_to_rank0((layers, arrays))
            if rank != 0:
                return
            layers, arrays = merge_ranks(parts)
            out_dir = self.out_dir
        else:
            out_dir = self.out_dir / f"rank{rank}" if world > 1 else self.out_dir
        case = build_case(layers, arrays, options, where, self.params)
        self.written = save_cases(out_dir, [compute_expected(case)], generator={"name": "verification.oracle.trl"})
        size = sum(f.stat().st_size for f in Path(self.written).parent.iterdir() if f.is_file())
        self.log(f"oracle case {case.id}: {case.n_microbatches} microbatches, {len(layers)} tensors, "
                 f"{size / MEGABYTE:.2f} MiB written to {Path(self.written).parent}")


def float64_twin(model: nn.Module, exclude, patterns=()) -> nn.Module:
    """A float64 copy of ``model`` running its classes' forwards (eager attention as SDPA), with only the case's
    parameters trainable.

    The case's parameters: the trainable ones not in ``exclude``; with ``patterns``, those whose name matches
    one of them (fnmatch). Raises ValueError when none is left.
    """
    twin = copy.deepcopy(model).double()
    for module in twin.modules():
        module.__dict__.pop("forward", None)   # TRL's fused head / accelerate's wrapper: bound to the original
    if getattr(getattr(twin, "config", None), "_attn_implementation", None) == "eager":
        # HF's eager attention takes its softmax in float32: float64's mask value becomes -inf there, a left-padded
        # row's padding queries give NaN, and 0 * NaN spreads it to the real tokens. SDPA computes the same
        # attention in float64.
        try:
            twin.set_attn_implementation("sdpa")
        except (ValueError, ImportError, AttributeError):
            pass
    names = [n for n, p in twin.named_parameters() if p.requires_grad and n not in set(exclude)]
    if patterns:
        unmatched = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
        if unmatched:
            raise ValueError(f"proma_oracle_params: {unmatched} match no projected trainable parameter (e.g. "
                             f"{names[:3]})")
        names = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if not names:
        raise ValueError("the oracle case would hold no parameter (every trainable parameter is excluded)")
    keep = set(names)
    for name, p in twin.named_parameters():
        p.requires_grad_(name in keep)
    return twin


def seq_logp_fn(temperature: float):
    """``(model, batch) -> (b,)`` total log-probability of each completion's scored tokens (full logits)."""

    def seq_logp(model, batch):
        k = batch["logits_to_keep"]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits[:, -k - 1:-1] / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, -k:, None]).squeeze(-1)
        return (lp * batch["loss_mask"]).sum(-1)

    return seq_logp


def size_lines(twin: nn.Module, records: list) -> list:
    """One line per microbatch: the case's float64 size from the parameters' shapes and the token count."""
    linear_calls = {}
    for module in twin.modules():
        if isinstance(module, nn.Linear):
            linear_calls[id(module.weight)] = linear_calls.get(id(module.weight), 0) + 1
    other_owner = linear_weight_owners(twin)
    params = [(n, p) for n, p in twin.named_parameters() if p.requires_grad]
    lines = []
    for m, rec in enumerate(records):
        b, t = rec["input_ids"].shape[0], int(rec["attention_mask"].sum())
        linear, dense = 0, {}
        for name, p in params:
            if p.dim() == 2:
                linear += linear_calls.get(id(p), 0) * t * (p.shape[0] + p.shape[1] + 1)
            if other_owner.get(id(p), True):
                dense[name] = b * p.numel()
        expected = 3 * sum(p.numel() for _, p in params)
        total = BYTES_PER_NUMBER * (linear + sum(dense.values()) + expected + b)
        biggest = max(dense, key=dense.get) if dense else None
        lines.append(f"microbatch {m}: b={b}, {t} tokens, about {total / MEGABYTE:.2f} MiB float64 (linear factors "
                     f"{BYTES_PER_NUMBER * linear / MEGABYTE:.2f} MiB, dense per-sequence gradients "
                     f"{BYTES_PER_NUMBER * sum(dense.values()) / MEGABYTE:.2f} MiB"
                     + (f", largest {biggest}" if biggest else "") + "); restrict with proma_oracle_params")
    return lines


def gather_to_rank0(obj) -> list | None:
    """Every rank's ``obj`` on rank 0 (ranks in order), None elsewhere (torch.distributed's object gather)."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def merge_ranks(parts: list) -> tuple:
    """One case's (layers, arrays) over the ranks' microbatches: microbatch m is every rank's m-th, in order.

    Rows of a linear use's X, D are stacked and ``seq`` shifted by the sequences of earlier ranks; dense
    ``seq_grads`` stacked; weights concatenated and divided by the number of ranks W (the accumulator's
    global weights).
    """
    layers = parts[0][0]
    for r, (rank_layers, _) in enumerate(parts):
        if rank_layers != layers:
            raise RuntimeError(f"rank {r} captured other layers or uses than rank 0")
    n_mb = sum(1 for key in parts[0][1] if key.endswith("/weights"))
    if any(sum(1 for key in arr if key.endswith("/weights")) != n_mb for _, arr in parts):
        raise RuntimeError("ranks ran different numbers of microbatches")
    out = {}
    for m in range(n_mb):
        sizes = [len(arr[weights_key(m)]) for _, arr in parts]
        offsets = np.cumsum([0] + sizes[:-1])
        out[weights_key(m)] = np.concatenate([arr[weights_key(m)] for _, arr in parts]) / len(parts)
        for k, layer in enumerate(layers):
            for u, kind in enumerate(layer.uses):
                names = ("X", "D") if kind == "linear" else ("seq_grads",)
                for name in names:
                    out[use_key(m, k, u, name)] = np.concatenate([arr[use_key(m, k, u, name)] for _, arr in parts])
                if kind == "linear":
                    out[use_key(m, k, u, "seq")] = np.concatenate(
                        [arr[use_key(m, k, u, "seq")] + off for (_, arr), off in zip(parts, offsets)])
    return layers, out


def build_case(layers, arrays: dict, options: dict, where: dict, params=()) -> Case:
    """The case (no expected arrays yet) of captured ``layers`` / ``arrays`` under the trainer's ``options``."""
    settings = {k: options[k] for k in SETTING_NAMES}
    if settings["variant"] == "proma" and settings["solver"] == "none":   # removes nothing: plain accumulation
        settings.update(variant="none", solver="exact")
    n_mb = sum(1 for key in arrays if key.endswith("/weights"))
    sizes = [len(arrays[weights_key(m)]) for m in range(n_mb)]
    world, sync = where["world"], where["sync"]
    if world == 1:
        scope, suffix = "one process", ""
    elif sync == "global":
        scope, suffix = f"the union of {world} ranks' microbatches (sync='global', weights / {world})", "_global"
    else:
        scope, suffix = f"rank {where['rank']} of {world} (sync='local', before the average over ranks)", \
            f"_rank{where['rank']}"
    restricted = f"; parameters restricted to {list(params)}" if params else ""
    excluded = f"; proma_exclude {sorted(options['exclude'])} left out" if options["exclude"] else ""
    what = f"optimizer step {where['step']} of a TRL PromaGRPOTrainer run, {scope}{restricted}{excluded}"
    return Case(id=f"trl_grpo_{settings['variant']}_{settings['solver']}{suffix}", description=what,
                settings=Settings(**settings), layers=list(layers), boundaries=[0] + np.cumsum(sizes).tolist(),
                arrays=arrays, tags=["real", "trl"])
