"""Blends of trained runs: several recipes (2.5D smp U-Nets, 3D MONAI networks) averaged with
weights on each slice's native grid, one case-day at a time.

A *run* is a ``runs/<config name>`` folder of ``fold*/best.pt``; a *member* of a blend is one
run, its folds averaged (as a single-run submission does), with a weight ``w``. Each member is
rebuilt from the config in its own checkpoints, so members may differ in encoder, canvas,
2.5D slices or dimensionality. Every member yields one case-day's float32 (D, 3, H, W)
probabilities at the slices' own size, quantised to uint8 as its OOF files keep them; the blend
is ``rint(sum(w_i * q_i) / sum(w_i))`` of those, then post-processed (so ``evaluate.py
--select`` forms any blend from the members' stored OOF files exactly). The members run in
lockstep, case-day by case-day, so memory holds one case-day per member whatever the size of
the test set.

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
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from gitract.atomic import write_text_atomic
from gitract.data.cache import VolumeCache
from gitract.errors import CheckpointError, ConfigError
from gitract.models.checkpoint import find_checkpoints, run_config_of
from gitract.models.kind import DayPrediction, Predictor
from gitract.models.kinds import kind_of
from gitract.postprocess.steps import blend_quantized, quantize

__all__ = [
    "BlendSpec",
    "BlendedDay",
    "DayPrediction",
    "Member",
    "MemberSpec",
    "add_spec_arguments",
    "blend_days",
    "blend_spec",
    "load_member",
    "read_ensemble",
    "resolve_spec",
    "write_ensemble",
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


def write_ensemble(spec: BlendSpec, path: str | Path, comment: str = "") -> None:
    """Write ``spec`` as an ensemble file :func:`read_ensemble` reads back (run paths as they
    are, relative to the folder it is used from), atomically; ``comment``: header lines."""
    members = [
        {"run": str(m.run), "weight": int(m.weight) if float(m.weight).is_integer() else m.weight}
        for m in spec.members
    ]
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    body = yaml.safe_dump({"dir": str(spec.dir), "members": members}, sort_keys=False)
    write_text_atomic(Path(path), header + body)


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


@dataclass(frozen=True)
class Member:
    """One run of a blend: its name, its folds as one predictor (from its model kind), and
    its weight."""

    name: str
    predictor: Predictor
    weight: float = 1.0

    def days(
        self, table: pd.DataFrame, cache: VolumeCache, progress: bool = True
    ) -> Iterator[DayPrediction]:
        """One :class:`DayPrediction` per case-day of ``table`` (sorted by case, day, slice)."""
        return self.predictor.days(table, cache, progress)


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
    kind = kind_of(run_config_of(paths[0]))
    predictor = kind.load_predictor(paths, device, num_workers=num_workers)
    return Member(spec.run.name, predictor, spec.weight)


@dataclass(frozen=True)
class BlendedDay:
    """One case-day of a blend: slice ids in slice order, quantised uint8 (D, 3, H, W)
    probabilities at the slices' own size and the quantised (D, 3) presence (or None): the
    form the OOF files keep and post-processing reads."""

    case_day: str
    ids: list[str]
    probs: np.ndarray
    presence: np.ndarray | None = None


def blend_days(
    members: Sequence[Member], table: pd.DataFrame, cache: VolumeCache, progress: bool = True
) -> Iterator[BlendedDay]:
    """The blend of the members' predictions, one case-day at a time (``table`` sorted by case,
    day, slice). Each member's probabilities are quantised first, as its own OOF files keep
    them, then :func:`~gitract.postprocess.steps.blend_quantized` takes their weighted mean:
    the blend that ``evaluate.py --select`` forms from those files is exactly this one. The
    presence probability is the weighted mean over the members that have one (None when none
    has). A single member is its own quantised prediction."""
    if not members:
        raise CheckpointError("a blend needs at least one member")
    streams = [m.days(table, cache, progress) for m in members]
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
        weights = [m.weight for m in members]
        probs = blend_quantized([quantize(day.probs) for day in days], weights)
        present = [(quantize(d.presence), m.weight) for m, d in zip(members, days, strict=True)
                   if d.presence is not None]  # fmt: skip
        presence = blend_quantized(*zip(*present, strict=True)) if present else None
        yield BlendedDay(first.case_day, first.ids, probs, presence)
