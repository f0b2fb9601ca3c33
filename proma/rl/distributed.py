"""Data parallelism of the harness: one process per rank under ``torchrun``, prompts split across ranks.

``torchrun --nproc_per_node 2 -m proma.rl.cli train ...`` sets ``RANK``, ``WORLD_SIZE`` (and ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); :func:`init` then joins the process group (gloo on CPU, NCCL on CUDA, one
GPU per local rank). Without them everything here is the identity and the harness runs in one process.

Layout: ``cfg.prompts_per_step``, ``cfg.minibatches`` and ``cfg.microbatch_size`` describe the *global* step;
rank r takes prompts ``[r * P / W, (r + 1) * P / W)`` of each step's draw (whole GRPO groups, so advantages
stay rank-local), and every local minibatch and microbatch holds 1/W of the global one. The gradient is the
mean over ranks (DDP's convention), so every rank's loss weights are W times the global minibatch's (see
:meth:`Ranks.weight_scale`); with ``sync="global"`` PROMA projects against the union of the ranks'
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

    def weight_scale(self) -> float:
        """Factor of the local loss weights: the ranks' gradients are averaged, so each carries W x its share."""
        return float(self.world)

    def sum(self, values, device=None) -> list[float]:
        """Element-wise sum of a list of floats over the ranks (one all-reduce)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device(device))
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation over the ranks (rank order) of equally shaped tensors, on every rank."""
        if not self.active:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _device(device):
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if device is None else torch.device("cpu")


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
