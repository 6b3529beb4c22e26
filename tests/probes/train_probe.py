"""scripts/train.py with test hooks, run by torchrun from tests (one copy per rank).

``GITRACT_PROBE_NAN_AT=k``: rank 0's k-th loss is NaN (the other ranks' stay finite), so the
skip must be decided across ranks. ``GITRACT_PROBE_SAME_SAMPLES=DIR``: every rank draws the
same slices and writes a checksum of its first batch to ``DIR/rank<r>.txt``, so the ranks'
batches can differ only by their augmentations.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

import gitract.training.engine as engine

ROOT = Path(__file__).resolve().parents[2]
rank = int(os.environ.get("RANK", "0"))

if nan_at := int(os.environ.get("GITRACT_PROBE_NAN_AT", "0")):
    real_build_loss = engine.build_loss

    def build_loss(train_cfg):
        loss_fn, calls = real_build_loss(train_cfg), []

        def forward(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            value = loss_fn(logits, targets)
            return value * float("nan") if rank == 0 and len(calls) == nan_at else value

        return forward

    engine.build_loss = build_loss

if out := os.environ.get("GITRACT_PROBE_SAME_SAMPLES"):

    class SameSamples(engine.SeededSampler):
        """Rank 0's slices on every rank; each rank's own item seeds."""

        def __init__(self, dataset, seed, rank, world_size) -> None:
            super().__init__(dataset, seed, rank, world_size)
            self.inner = DistributedSampler(
                dataset, num_replicas=world_size, rank=0, shuffle=True, seed=seed
            )

    engine.SeededSampler = SameSamples
    real_epoch = engine.train_one_epoch

    def train_one_epoch(loop, state, loader, epoch):
        first = next(iter(loader))["image"]
        Path(out, f"rank{rank}.txt").write_text(f"{first.double().sum().item():.10f}\n")
        return real_epoch(loop, state, loader, epoch)

    engine.train_one_epoch = train_one_epoch

sys.argv = [str(ROOT / "scripts" / "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
