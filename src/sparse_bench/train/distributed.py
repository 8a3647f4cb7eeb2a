"""torchrun / DDP: one process per device, rank 0 decides masks, logs and checkpoints.

Launch with ``torchrun --nproc_per_node=N -m sparse_bench ...``: the usual environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) select the process group. A
SLURM job of several tasks (``srun``, or Hydra's submitit launcher with ``tasks_per_node`` > 1, its
local executor too) needs no torchrun: its own variables are read instead (submitit's
``TorchDistributedEnvironment``: rank, world, local rank, the first node as master, a port from the
job id).
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


#: the job variables that give the number of tasks: submitit's local executor's, then SLURM's
_TASKS = {"local": "SUBMITIT_LOCAL_NTASKS", "slurm": "SLURM_NTASKS"}


def from_env() -> Dist:
    """This process's place: torchrun's variables, else those of a SLURM / submitit job of several
    tasks (exported as torchrun's, so the process group starts the same way)."""
    if "RANK" not in os.environ:
        _export_job_env()
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def _export_job_env() -> None:
    executor = os.environ.get("SUBMITIT_EXECUTOR") or ("slurm" if "SLURM_JOB_ID" in os.environ else None)
    if executor not in _TASKS or int(os.environ.get(_TASKS[executor], "1") or 1) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    plain = "SUBMITIT_EXECUTOR" not in os.environ
    os.environ["SUBMITIT_EXECUTOR"] = executor  # srun without submitit: its SLURM reader, all the same
    try:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    finally:
        if plain:
            del os.environ["SUBMITIT_EXECUTOR"]


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
def broadcast_masks(method, optimizer, d: Dist) -> None:
    """Rank 0's masks, prunable weights and their optimizer state, everywhere (after set-up)."""
    if not d.enabled or method.masks is None:
        return
    method.masks.broadcast_(optimizer, dist)
    verify_masks(method, d, 0)


_HASH_MULT, _HASH_MOD = 1_000_003, 2_147_483_647


@torch.no_grad()
def mask_checksums(masks) -> torch.Tensor:
    """Per layer of a MaskSet: (active count, a hash of the active positions), as one int64
    tensor (read from the index structure for sparse-executed layers, no dense mask needed)."""
    out = []
    for i in range(len(masks)):
        idx = masks.active_indices(i)
        out.append(idx.numel() + torch.zeros((), dtype=torch.long, device=idx.device))
        out.append(((idx * _HASH_MULT + 12_345) % _HASH_MOD).sum())  # int64 wraps the same everywhere
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def verify_masks(method, d: Dist, step: int) -> None:
    """Every rank decides each mask update itself (same gradients, same seeds); all ranks
    compare checksums of the result and stop with one line if any mask differs."""
    if not d.enabled or method.masks is None:
        return
    mine = mask_checksums(method.masks)
    everyone = [torch.empty_like(mine) for _ in range(d.world)]
    dist.all_gather(everyone, mine)
    for rank, theirs in enumerate(everyone):
        if not torch.equal(theirs, everyone[0]):
            diff = (theirs != everyone[0]).nonzero().flatten().tolist()
            layer = method.masks.names[diff[0] // 2]
            counts = (int(everyone[0][diff[0] // 2 * 2]), int(theirs[diff[0] // 2 * 2]))
            from ..errors import RunFailed

            where = (f"{counts[0]} active weights on rank 0 and {counts[1]} on rank {rank}" if counts[0] != counts[1]
                     else f"{counts[0]} active weights on ranks 0 and {rank}, at different positions")
            raise RunFailed(
                f"masks differ between processes after the mask update at step {step}: {layer} has {where}; "
                f"the ranks no longer train the same model (a non-deterministic kernel or unequal gradients)")


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def shutdown(d: Dist, wait: bool = True) -> None:
    """Destroy the process group. After a finished run (wait=True) every rank first waits for
    the others, so no rank tears its connections down while another still uses them; after a
    failure there is no waiting for a rank that may be gone. Nothing may still reference the
    group (a DDP wrapper does): its threads are joined only when the last reference goes."""
    if not (d.enabled and dist.is_initialized()):
        return
    import gc

    if wait:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()
