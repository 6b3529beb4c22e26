"""Writing checkpoints so that a kill at any moment leaves the previous one intact."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from gitract.atomic import atomic_path

__all__ = ["save_checkpoint"]


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Save ``state`` to ``path`` atomically: a temp file in the same folder, fsync, rename.

    ``state`` must hold only what ``torch.load(..., weights_only=True)`` accepts (tensors,
    containers, numbers, strings): no pickled callables, so loading a checkpoint never runs code.
    """
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())  # on disk before the rename makes it the checkpoint
    # A writer killed mid-save (kill -9) leaves its temp file behind, as big as a checkpoint;
    # the next successful save sweeps such leftovers away.
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
