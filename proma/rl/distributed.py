"""Data parallelism of the harness: one process per rank under ``torchrun``, prompts split across ranks.

``torchrun --nproc_per_node 2 -m proma.rl.cli train ...`` sets ``RANK``, ``WORLD_SIZE`` (and ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); :func:`init` then joins the process group (gloo on CPU, NCCL on CUDA, one
GPU per local rank). Without them everything here is the identity and the harness runs in one process.

Layout: ``cfg.prompts_per_step``, ``cfg.minibatches`` and ``cfg.microbatch_size`` describe the *global* step;
rank r takes prompts ``[r * P / W, (r + 1) * P / W)`` of each step's draw (whole GRPO groups, so advantages
stay rank-local), and every local minibatch and microbatch holds 1/W of the global one. The gradient is the
mean over ranks (DDP's convention), so every rank's loss weights are W times the global minibatch's (see
:meth:`Ranks.token_mean_factor`); with ``sync="global"`` PROMA projects against the union of the ranks'
microbatches, i.e. against the same global microbatches as a single process with the same configuration.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks; ``world == 1`` without torchrun."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory (config, metrics, checkpoints)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def split(self, n: int, what: str) -> slice:
        """Rank's contiguous share of ``n`` items; ``n`` must be a multiple of the world size."""
        if n % self.world:
            raise ValueError(f"{what}={n} must be a multiple of the number of processes ({self.world})")
        k = n // self.world
        return slice(self.rank * k, (self.rank + 1) * k)

    def token_mean_factor(self, n_local: float) -> float:
        """Turns a token-mean coefficient 1/N_local into W / N_global (N: scored tokens of the minibatch).

        The ranks' gradients are averaged, so each rank's loss carries W times its share of the global
        minibatch loss. (The per-sequence aggregation needs no factor: 1/(B_local n_i) = W/(B_global n_i).)
        """
        if not self.active:
            return 1.0
        n_global = self.sum([n_local])[0]
        return self.world * max(n_local, 1.0) / max(n_global, 1.0)

    def local_config(self, cfg):
        """This rank's share of ``cfg``: ``prompts_per_step`` and ``microbatch_size`` divided by W.

        The local minibatches and microbatches are then 1/W of the global ones, so the union of the ranks'
        k-th microbatches is a global microbatch of ``cfg.microbatch_size`` sequences.
        """
        if not self.active:
            return cfg
        for name in ("prompts_per_step", "microbatch_size"):
            self.split(getattr(cfg, name), name)
        return cfg.replace(prompts_per_step=cfg.prompts_per_step // self.world,
                           microbatch_size=cfg.microbatch_size // self.world)

    def sum(self, values) -> list[float]:
        """Element-wise sum of a list of floats over the ranks (one all-reduce)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation over the ranks (rank order) of equally shaped tensors, on every rank."""
        if not self.active:
            return t
        x = t.contiguous().to(_comm_device())
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x)
        return torch.cat(parts).to(t.device)

    def combine(self, rec: dict, *, keep=(), token_keys=(), tokens: float = 0.0) -> dict:
        """One metrics record from every rank's: the same on every rank.

        ``keep``: keys already global (taken as they are); ``token_keys``: token means, weighted by this
        rank's ``tokens``; ``time/*`` and ``step_time``: the slowest rank; every other number: the mean over
        ranks (per-sequence means and sums of per-rank shares; every rank holds as many sequences).
        """
        if not self.active:
            return rec
        nums = sorted(k for k, v in rec.items() if k not in keep and isinstance(v, (int, float))
                      and not isinstance(v, bool))
        slow = [k for k in nums if k.startswith("time/") or k == "step_time"]
        mean = [k for k in nums if k not in slow]
        sums = self.sum([rec[k] * (tokens if k in token_keys else 1.0) for k in mean] + [tokens])
        total = max(sums[-1], 1e-300)
        out = dict(rec)
        for k, v in zip(mean, sums):
            out[k] = v / total if k in token_keys else v / self.world
        if slow:
            t = torch.tensor([float(rec[k]) for k in slow], dtype=torch.float64, device=_comm_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            out.update(zip(slow, t.tolist()))
        return out

    def average_gradients(self, model) -> None:
        """``p.grad`` <- its mean over the ranks (one all-reduce; for the plain-backward method, grpo)."""
        if not self.active:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world
        start = 0
        for p in params:
            p.grad.copy_(flat[start:start + p.numel()].view_as(p))
            start += p.numel()

    def broadcast_(self, model) -> None:
        """Every rank starts from rank 0's parameters and buffers."""
        if self.active:
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init(device: torch.device) -> Ranks:
    """Join the process group described by torchrun's environment (idempotent); ``Ranks()`` without one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())
