"""DistributedDataParallel plumbing: one process per device under ``torchrun``, or a plain run.

``torchrun --nproc_per_node=N scripts/train.py ...`` sets RANK, WORLD_SIZE and LOCAL_RANK; we
then join the process group (nccl on CUDA, gloo on CPU; ``GITRACT_DIST_BACKEND=gloo`` chooses gloo
on CUDA too, which lets two ranks share one GPU, as ``scripts/gpu_check.py`` runs them), each
rank trains on its share of the batches, metrics are summed across ranks, and only rank 0
writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "all_gather_objects",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "cleanup_distributed",
    "init_distributed",
    "launch_env",
    "pick_backend",
    "resolve_num_workers",
]

# NCCL's default is 10 minutes: generous for a collective, short for a slow first epoch's
# validation on a big set. Collectives that hang for real still end, just later.
DEFAULT_TIMEOUT = timedelta(minutes=30)
#: Environment variable that overrides the process-group backend (``gloo`` or ``nccl``).
BACKEND_ENV = "GITRACT_DIST_BACKEND"


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


def launch_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) as torchrun set them; (0, 1, 0, 1) in a
    plain run. Read without joining the process group, so work can be shared out before it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    return rank, world_size, local_rank, local_world


def resolve_num_workers(num_workers: int | None, local_world_size: int = 1) -> int:
    """DataLoader workers: the config's number, or (None) this process's share of the CPU
    cores: all of it on a small machine (a 2-4 core Kaggle kernel, where the loop mostly waits
    on the GPU), one core kept for the loop and at most 8 on a workstation."""
    if num_workers is not None:
        return num_workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    share = max(1, cores // max(1, local_world_size))
    return share if share <= 4 else min(8, share - 1)


def pick_backend(use_cuda: bool) -> str:
    """The process group's backend: ``$GITRACT_DIST_BACKEND`` when set, else nccl on CUDA and
    gloo on the CPU. NCCL refuses two ranks on one GPU; gloo takes them (slower, for checks)."""
    backend = os.environ.get(BACKEND_ENV, "").strip().lower()
    if backend and backend not in ("gloo", "nccl"):
        raise ValueError(f"${BACKEND_ENV}={backend!r}: expected gloo or nccl")
    return backend or ("nccl" if use_cuda else "gloo")


def init_distributed() -> DistContext:
    """Join the process group if launched by torchrun; pick this rank's device (local rank
    modulo the visible GPUs: more ranks than GPUs share them, which only gloo allows)."""
    rank, world_size, local_rank, _ = launch_env()
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend=pick_backend(use_cuda), timeout=DEFAULT_TIMEOUT)
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


def all_reduce_max(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise maximum over all ranks, in place on ``tensor``'s device (which must be the
    rank's device under nccl). Queued on the stream like any collective: no host sync."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if ctx.enabled:
        dist.barrier()


def cleanup_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
