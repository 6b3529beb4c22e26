"""DistributedDataParallel plumbing: one process per device under ``torchrun``, or a plain run.

``torchrun --nproc_per_node=N scripts/train.py ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; we
then join the process group (nccl on CUDA, gloo on CPU), each rank trains on its share of the
batches, metrics are summed across ranks, and only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "all_reduce_sum", "barrier", "cleanup_distributed", "init_distributed"]


@dataclass(frozen=True)
class DistContext:
    """Who this process is: its rank among ``world_size`` and the device it drives."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, history and pictures, and shows progress bars."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(prefer_cuda: bool = True) -> DistContext:
    """Join the process group if launched by torchrun; pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = prefer_cuda and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank, world_size, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op in a single process); returns a new tensor."""
    out = tensor.detach().clone()
    if ctx.enabled:
        # gloo cannot reduce CUDA tensors and nccl cannot reduce CPU ones: match the backend.
        on_device = out.to(ctx.device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        out = on_device.to(tensor.device)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if ctx.enabled:
        dist.barrier()


def cleanup_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
