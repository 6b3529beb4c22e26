"""Checkpoints on disk: written so that a kill at any moment leaves the previous one intact, read
with ``weights_only=True`` so that loading one never runs code, and found in a runs folder.

Checkpoints are plain dicts (``{"model": state_dict, "config": config_to_dict(cfg), ...}``):
the config inside is enough to rebuild the network (the nanoGPT way)."""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gitract.atomic import atomic_path, remove_stale_temps
from gitract.config import Config, config_from_dict, load_config
from gitract.errors import CheckpointError

__all__ = [
    "find_checkpoints",
    "load_checkpoint",
    "run_config_of",
    "save_checkpoint",
    "state_mismatch",
    "strip_prefix",
]


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
    remove_stale_temps(path.parent, path.name)


def _torch_load(path: Path, what: str, error: type[Exception]) -> Any:
    """``torch.load(weights_only=True)`` on the CPU; failures become ``error`` naming the file.

    weights_only refuses any pickled global (a class, a function such as ``os.system``): such a
    file is reported as unsafe, not loaded with weights_only=False.
    """
    if not path.is_file():
        raise error(f"{what} {path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL\s+([\w.]+)", str(e), re.IGNORECASE)
        if found:
            raise error(
                f"{what} {path}: refused: it holds pickled objects ({found[1]}), not only tensors "
                f"and plain data (loaded with weights_only=True)"
            ) from e
        raise error(f"{what} {path}: not a readable torch file (unpickling failed)") from e
    except Exception as e:  # truncated or corrupt zip, not a torch file at all
        raise error(f"{what} {path}: not a readable torch file ({_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint dict on the CPU with ``weights_only=True`` (no pickled code runs).

    A missing, unreadable or unsafe file (one that carries a pickled callable) raises
    CheckpointError naming it.
    """
    path = Path(path)
    ckpt = _torch_load(path, "checkpoint", CheckpointError)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(ckpt).__name__}")
    return ckpt


def find_checkpoints(runs: str | Path, folds: Sequence[int] | None = None) -> list[Path]:
    """``best.pt`` of each listed fold under ``runs`` (``runs/fold<N>/best.pt``), or every
    ``best.pt`` below ``runs`` when no folds are given."""
    runs = Path(runs)
    if folds:
        paths = [runs / f"fold{fold}" / "best.pt" for fold in folds]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise CheckpointError(f"no checkpoint for the requested folds: {', '.join(missing)}")
        return paths
    paths = sorted(runs.rglob("best.pt"))
    if not paths:
        raise CheckpointError(
            f"no best.pt under {runs}: train first (python scripts/train.py --fold 0) "
            "or point --runs at a runs/<config name> folder"
        )
    return paths


def run_config_of(checkpoint: Path) -> Config:
    """The config of one fold: its ``config.yaml`` beside ``best.pt`` (cheap), else the one
    stored in the checkpoint."""
    if (checkpoint.parent / "config.yaml").is_file():
        return load_config(checkpoint.parent / "config.yaml")
    return config_from_dict(
        load_checkpoint(checkpoint)["config"], source=f"checkpoint {checkpoint}"
    )


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the key prefix that torch.compile ('_orig_mod.') or DataParallel ('module.') adds."""
    state = dict(state)
    for prefix in ("_orig_mod.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def state_mismatch(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """None if ``state`` fits ``module`` exactly, else 'N missing, M unexpected keys, e.g. ...'."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if not (missing or unexpected or shapes):
        return None
    msg = f"{len(missing)} missing, {len(unexpected)} unexpected keys"
    if shapes:
        msg += f", {len(shapes)} of another shape"
    examples = []
    if missing:
        examples.append(f"missing '{missing[0]}'")
    if unexpected:
        examples.append(f"unexpected '{unexpected[0]}'")
    if shapes:
        k = shapes[0]
        examples.append(f"'{k}' is {tuple(state[k].shape)}, expected {tuple(own[k].shape)}")
    return f"{msg}, e.g. {'; '.join(examples)}"
