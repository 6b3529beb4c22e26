"""Blends of trained runs: several recipes (2.5D smp U-Nets, 3D MONAI networks) averaged with
weights on each slice's native grid, one case-day at a time.

A *run* is a ``runs/<config name>`` folder of ``fold*/best.pt``; a *member* of a blend is one
run, its folds averaged (as a single-run submission does), with a weight ``w``. Each member is
rebuilt from the config in its own checkpoints, so members may differ in encoder, canvas,
2.5D slices or dimensionality. Every member yields one case-day's float32 (D, 3, H, W)
probabilities at the slices' own size; the blend is ``sum(w_i * p_i) / sum(w_i)``, and only
then is it quantised and post-processed. The members run in lockstep, case-day by case-day, so
memory holds one case-day per member whatever the size of the test set.

An ensemble file (YAML, or JSON) names the members and where the blend's own files go (its
``oof_probs/`` and the ``postprocess.json`` that ``evaluate.py --tune`` writes)::

    dir: runs/blend_b7_3d          # optional; default runs/<file stem>
    members:
      - run: runs/default          # paths relative to the current folder (or ``base``)
        weight: 0.6
      - run: runs/default_3d
        weight: 0.4
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn

from gitract.config import Config, config_from_dict
from gitract.data.cache import VolumeCache
from gitract.data.patches import load_volume
from gitract.errors import CheckpointError, ConfigError, DataError
from gitract.models.checkpoint import find_checkpoints, load_checkpoint, run_config_of
from gitract.models.monai3d import build_model3d
from gitract.models.predict2d import Ensemble, predict_slices
from gitract.models.predict3d import predict_volume3d

__all__ = [
    "BlendSpec",
    "DayPrediction",
    "Member",
    "Member2D",
    "Member3D",
    "MemberSpec",
    "add_spec_arguments",
    "blend_days",
    "blend_spec",
    "load_member",
    "read_ensemble",
    "resolve_spec",
]


@dataclass(frozen=True)
class MemberSpec:
    """One run of a blend and its weight."""

    run: Path
    weight: float = 1.0


@dataclass(frozen=True)
class BlendSpec:
    """The members of a blend and its folder (OOF probabilities, postprocess.json)."""

    members: tuple[MemberSpec, ...]
    dir: Path


@dataclass
class DayPrediction:
    """One case-day: slice ids in slice order, float32 (D, 3, H, W) probabilities at the
    slices' own size, and the per-slice presence probability (D, 3) or None."""

    case_day: str
    ids: list[str]
    probs: np.ndarray
    presence: np.ndarray | None = None


def _check_weight(value: object, where: str) -> float:
    try:
        weight = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: weight must be a number > 0, got {value!r}") from None
    if not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"{where}: weight must be a number > 0, got {weight:g}")
    return weight


def blend_spec(
    runs: Sequence[str | Path],
    weights: Sequence[float] | None = None,
    blend_dir: str | Path | None = None,
) -> BlendSpec:
    """A blend of ``runs`` with ``weights`` (default: equal). Its folder: ``blend_dir``, else
    the run's own for one run, else ``<first run's parent>/blend_<name>+<name>...``."""
    runs = [Path(r) for r in runs]
    if not runs:
        raise ConfigError("a blend needs at least one run")
    if weights is None:
        weights = [1.0] * len(runs)
    if len(weights) != len(runs):
        raise ConfigError(
            f"--weights: {len(weights)} weight(s) for {len(runs)} run(s); give one per run"
        )
    names = [r.name for r in runs]
    if len(set(r.resolve() for r in runs)) != len(runs):
        raise ConfigError(f"--runs: a run is listed twice ({', '.join(names)})")
    members = tuple(
        MemberSpec(run, _check_weight(w, f"--weights ({run})"))
        for run, w in zip(runs, weights, strict=True)
    )
    if blend_dir is not None:
        folder = Path(blend_dir)
    elif len(runs) == 1:
        folder = runs[0]
    else:
        folder = runs[0].parent / ("blend_" + "+".join(names))
    return BlendSpec(members, folder)


def read_ensemble(path: str | Path, base: str | Path | None = None) -> BlendSpec:
    """An ensemble file (see the module docstring); run paths relative to ``base`` (default:
    the current folder). Errors name the file and the entry."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: ensemble file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    members = data.get("members") if isinstance(data, dict) else None
    if not isinstance(members, list) or not members:
        raise ConfigError(f"{path}: needs 'members:', a list of {{run: <folder>, weight: <w>}}")
    base = Path(base) if base is not None else Path()
    specs = []
    for k, entry in enumerate(members):
        where = f"{path}: members[{k}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("run"), str):
            raise ConfigError(f"{where}: needs 'run: <runs folder>' (and optionally 'weight')")
        unknown = sorted(set(entry) - {"run", "weight"})
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (keys: run, weight)")
        specs.append(
            MemberSpec(base / entry["run"], _check_weight(entry.get("weight", 1.0), where))
        )
    unknown = sorted(set(data) - {"members", "dir"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (keys: members, dir)")
    folder = base / data["dir"] if data.get("dir") else base / "runs" / path.stem
    return BlendSpec(tuple(specs), folder)


def resolve_spec(
    runs: Sequence[str | Path] | None,
    weights: Sequence[float] | None,
    blend_dir: str | Path | None,
    ensemble: str | Path | None,
    default: Path,
) -> BlendSpec:
    """The one spec behind every script's ``--runs A [B ...] [--weights ...] [--blend-dir D]``
    or ``--ensemble FILE``: a single run is a blend of one (its own folder), ``default`` the
    run when neither is given."""
    if ensemble:
        if runs or weights or blend_dir:
            raise ConfigError(
                "--ensemble names the runs, weights and folder: not with --runs/--weights"
            )
        return read_ensemble(ensemble)
    return blend_spec(runs or [default], weights, blend_dir)


def add_spec_arguments(parser: argparse.ArgumentParser, runs_help: str) -> None:
    """The arguments :func:`resolve_spec` reads, worded the same in every script."""
    parser.add_argument("--runs", nargs="+", help=runs_help)
    parser.add_argument("--weights", type=float, nargs="+", help="blend weights, one per run")
    parser.add_argument(
        "--blend-dir", help="the blend's folder (default: the run's own; runs/blend_<A>+<B>)"
    )
    parser.add_argument("--ensemble", help="ensemble file (YAML: members: [{run, weight}], dir)")


# --------------------------------------------------------------------------- members


class Member(Protocol):
    """What a blend needs of a member: its weight and, for the slices of a table (sorted by
    case, day, slice), one :class:`DayPrediction` per case-day in that order."""

    name: str
    weight: float

    def days(
        self, table: pd.DataFrame, cache: VolumeCache, progress: bool = True
    ) -> Iterator[DayPrediction]: ...


@dataclass
class Member2D:
    """A 2.5D run: its folds' ``Ensemble``, slice batches grouped into
    case-days."""

    name: str
    ensemble: Ensemble
    weight: float = 1.0
    batch_size: int = 32
    num_workers: int = 0

    def days(
        self, table: pd.DataFrame, cache: VolumeCache, progress: bool = True
    ) -> Iterator[DayPrediction]:
        day_of = dict(zip(table["id"], table["case_day"], strict=True))
        stream = predict_slices(
            self.ensemble, table, cache, self.batch_size, self.num_workers, progress
        )
        for case_day, group in itertools.groupby(stream, key=lambda item: day_of[item[0]]):
            ids, probs, presence = zip(*group, strict=True)
            stacked = None if presence[0] is None else np.stack(presence).astype(np.float32)
            yield DayPrediction(case_day, list(ids), np.stack(probs), stacked)


@dataclass
class Member3D:
    """A 3D run: its folds' MONAI networks on whole case-day volumes (gitract.models.predict3d)."""

    name: str
    models: list[nn.Module]
    config: Config
    device: torch.device
    weight: float = 1.0
    amp: bool = False

    @classmethod
    def load(
        cls,
        name: str,
        paths: Sequence[Path],
        device: torch.device,
        weight: float = 1.0,
        tta_flips: Sequence[str] | None = None,
    ) -> Member3D:
        """Rebuild each fold with ``build_model3d`` from its own checkpoint's config and load
        its weights strictly; all folds must share the input settings (grid, patch size)."""
        models, configs = [], []
        for path in paths:
            ckpt = load_checkpoint(path)
            if "config" not in ckpt or "model" not in ckpt:
                raise CheckpointError(f"checkpoint {path}: needs 'config' and 'model' entries")
            try:
                cfg = config_from_dict(ckpt["config"], source=f"checkpoint {path} config")
                model = build_model3d(cfg.model, classes=3)
            except ConfigError as err:
                raise CheckpointError(f"checkpoint {path}: {err}") from None
            try:
                model.load_state_dict(ckpt["model"], strict=True)
            except RuntimeError as err:
                detail = str(err).splitlines()[0]
                raise CheckpointError(
                    f"checkpoint {path}: weights do not match its config "
                    f"({cfg.model.arch}): {detail}"
                ) from None
            models.append(model.to(device).eval())
            configs.append(cfg)
        first = (list(configs[0].data.grid_hw), list(configs[0].data.patch_size))
        for path, cfg in zip(paths, configs, strict=True):
            if (list(cfg.data.grid_hw), list(cfg.data.patch_size)) != first:
                raise CheckpointError(
                    f"{path}: grid/patch {cfg.data.grid_hw}/{cfg.data.patch_size} differ from "
                    f"{paths[0]}'s {first[0]}/{first[1]}; a member holds folds of one recipe"
                )
        cfg = configs[0]
        if tta_flips is not None:
            infer = cfg.infer.model_copy(update={"tta_flips": list(tta_flips)})
            cfg = cfg.model_copy(update={"infer": infer})
        amp = device.type == "cuda" and cfg.train.amp
        return cls(name, models, cfg, device, weight, amp)

    def days(
        self, table: pd.DataFrame, cache: VolumeCache, progress: bool = True
    ) -> Iterator[DayPrediction]:
        grid = (int(self.config.data.grid_hw[0]), int(self.config.data.grid_hw[1]))
        for case_day, rows in itertools.groupby(
            table[["id", "case_day", "height", "width"]].itertuples(index=False),
            key=lambda row: row.case_day,
        ):
            rows = list(rows)
            sizes = {(int(r.height), int(r.width)) for r in rows}
            if len(sizes) != 1:
                raise DataError(
                    f"{case_day}: slices of several sizes {sorted(sizes)}; a 3D member needs one"
                )
            ids = [r.id for r in rows]
            image, _ = load_volume(cache, ids, grid, with_mask=False)
            probs = predict_volume3d(
                self.models, image, sizes.pop(), self.config.data, self.config.infer,
                self.device, amp=self.amp,
            )  # fmt: skip
            yield DayPrediction(case_day, ids, probs, None)


def load_member(
    spec: MemberSpec,
    device: torch.device,
    folds: Sequence[int] | None = None,
    num_workers: int = 0,
) -> Member:
    """The member of ``spec``: its folds' checkpoints (``folds``, else all), each rebuilt from
    its own config, with that config's TTA flips and batch size (the run's own recipe, in a
    blend of one as in a blend of several)."""
    paths = find_checkpoints(spec.run, folds)
    cfg = run_config_of(paths[0])
    name = spec.run.name
    if cfg.model.kind == "3d":
        return Member3D.load(name, paths, device, spec.weight)
    ensemble = Ensemble.load(paths, device, cfg.infer.tta_flips)
    return Member2D(name, ensemble, spec.weight, cfg.infer.batch_size, num_workers)


def blend_days(
    members: Sequence[Member], table: pd.DataFrame, cache: VolumeCache, progress: bool = True
) -> Iterator[DayPrediction]:
    """The weighted mean of the members' probabilities, one case-day at a time (``table``
    sorted by case, day, slice). The presence probability is the mean over the members that
    have one (None when none has). A single member is passed through unchanged."""
    if not members:
        raise CheckpointError("a blend needs at least one member")
    streams = [m.days(table, cache, progress) for m in members]
    total_weight = float(sum(m.weight for m in members))
    for days in zip(*streams, strict=True):
        first = days[0]
        for member, day in zip(members, days, strict=True):
            if day.case_day != first.case_day or day.ids != first.ids:
                raise CheckpointError(
                    f"blend: member {member.name} predicted {day.case_day} while "
                    f"{members[0].name} predicted {first.case_day} (a bug: same table, same order)"
                )
            if day.probs.shape != first.probs.shape:
                raise CheckpointError(
                    f"blend: {day.case_day}: member {member.name} gave {day.probs.shape}, "
                    f"{members[0].name} {first.probs.shape}"
                )
        if len(members) == 1:
            yield first
            continue
        probs = np.zeros(first.probs.shape, dtype=np.float32)
        for member, day in zip(members, days, strict=True):
            probs += np.float32(member.weight) * day.probs
        probs /= np.float32(total_weight)
        present = [day.presence for day in days if day.presence is not None]
        presence = None if not present else np.mean(present, axis=0).astype(np.float32)
        yield DayPrediction(first.case_day, first.ids, probs, presence)
