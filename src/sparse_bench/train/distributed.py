"""torchrun / DDP: one process per device, rank 0 decides masks, logs and checkpoints.

Launch with ``torchrun --nproc_per_node=N -m sparse_bench ...``: the usual environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) select the process group.
``dataset.batch_size`` stays the GLOBAL batch size: every rank walks the same global batch order
and takes its slice of each batch, so the gradients DDP averages equal the single-process ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def init(d: Dist, device: torch.device) -> None:
    """Start the process group (NCCL on CUDA, Gloo on CPU) if this is a multi-process run."""
    if d.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                rank=d.rank, world_size=d.world)


def shard(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's rows of a global batch."""
    return x[d.rank:: d.world] if d.enabled else x


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def broadcast_masks(method, optimizer, d: Dist) -> int:
    """Rank 0's masks, prunable weights and their optimizer state, everywhere.

    Returns how many tensors differed on this rank before the broadcast (the "everyone checks"
    half: decisions are deterministic across ranks, so anything but 0 points to a bug).
    """
    if not d.enabled or method.masks is None:
        return 0
    return method.masks.broadcast_(optimizer, dist)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
