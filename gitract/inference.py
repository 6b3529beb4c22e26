"""Fold-ensemble inference: probabilities averaged over folds and flip TTA, masks back at each
slice's own size, RLE, and exactly the rows of ``sample_submission.csv``.

Probabilities are averaged on the model's canvas, taken back to the slice's H x W *before*
the threshold (bilinear when the canvas was scaled; a plain crop for the default 320x384 pad),
quantised to uint8 as the OOF files keep them, and post-processed one whole case-day at a time
(gitract.postprocess: threshold, 2D and 3D component filters, slice gate, z-continuity). Each
case-day is encoded to RLE as soon as its last slice is predicted, so memory holds one volume,
whatever the size of the test set.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from gitract.atomic import atomic_path
from gitract.config import Config, DataConfig, InferConfig, PostprocessConfig
from gitract.data import CLASSES, KAGGLE_INPUT, load_train_table, read_csv_file, scan_images
from gitract.errors import CheckpointError, ConfigError, DataError
from gitract.postprocess import ClassPostprocess, postprocess_volume, quantize
from gitract.rle import rle_encode
from gitract.volumes import VolumeCache

if TYPE_CHECKING:  # gitract.blend imports this module
    from gitract.blend import BlendSpec

__all__ = [
    "OOF_PROBS_DIR",
    "POSTPROCESS_FILE",
    "Ensemble",
    "default_output_path",
    "find_checkpoints",
    "encode_volume",
    "infer_oof",
    "infer_test",
    "load_postprocess",
    "params_from_config",
    "predict_slices",
    "predict_volumes",
    "read_sample_submission",
    "write_submission",
]

# Written by ``evaluate.py --tune`` into the runs folder; infer.py prefers it to the config.
POSTPROCESS_FILE = "postprocess.json"
# Where ``infer.py --oof`` leaves each case-day's probabilities for ``evaluate.py --tune``.
OOF_PROBS_DIR = "oof_probs"
KAGGLE_WORKING = Path("/kaggle/working")
# The input settings every model of an ensemble must share: they decide what a sample is.
INPUT_KEYS = ("n_slices", "slice_stride", "img_size", "resize_mode", "z_channel")
# TTA views: the tensor dimensions each flip reverses (on (N, C, H, W)).
FLIP_DIMS = {"hflip": (-1,), "vflip": (-2,)}

# gitract.model (smp, timm, torchvision), gitract.dataset (albumentations) and gitract.blend
# (which imports this module, and gitract.model) are imported where they are used: the empty
# public re-run and bad-input errors then answer in the time torch alone takes to import,
# without the ~3 s of the model stack.


def default_output_path(kaggle_root: Path = KAGGLE_WORKING) -> Path:
    """``/kaggle/working/submission.csv`` in a Kaggle kernel, else ``submissions/``."""
    if kaggle_root.is_dir() and KAGGLE_INPUT.parent.is_dir():
        return kaggle_root / "submission.csv"
    return Path("submissions/submission.csv")


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


@dataclass
class Ensemble:
    """Models of one recipe's folds; ``predict`` averages their sigmoid outputs over TTA."""

    models: list[nn.Module]
    configs: list[Config]
    device: torch.device
    tta_flips: tuple[str, ...] = ()
    amp: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        self.tta_flips = tuple(self.tta_flips)
        unknown = [name for name in self.tta_flips if name not in FLIP_DIMS]
        if unknown:
            raise ConfigError(
                f"infer.tta_flips: unknown flip {unknown[0]!r}; expected some of {list(FLIP_DIMS)}"
            )
        if not self.models or len(self.models) != len(self.configs):
            raise CheckpointError(
                f"an ensemble needs at least one model and one config per model; got "
                f"{len(self.models)} models and {len(self.configs)} configs"
            )

    @classmethod
    def load(
        cls, paths: Sequence[Path], device: torch.device, tta_flips: Sequence[str] = ()
    ) -> Ensemble:
        """Each model is rebuilt from the config stored in its own checkpoint."""
        from gitract.model import load_checkpoint, load_model_from_checkpoint

        if not paths:
            raise CheckpointError("no checkpoints to ensemble")
        models, configs = [], []
        for path in paths:
            model, cfg = load_model_from_checkpoint(load_checkpoint(path), source=str(path))
            models.append(model.to(device).eval())
            configs.append(cfg)
        first = {k: getattr(configs[0].data, k) for k in INPUT_KEYS}
        for path, cfg in zip(paths, configs, strict=True):
            other = {k: getattr(cfg.data, k) for k in INPUT_KEYS}
            if other != first:
                raise CheckpointError(
                    f"{path}: input settings {other} differ from {paths[0]}'s {first}; "
                    "ensemble only folds of one recipe"
                )
        on_cuda = device.type == "cuda"
        channels_last = on_cuda and configs[0].train.channels_last
        if channels_last:
            models = [m.to(memory_format=torch.channels_last) for m in models]
        amp = on_cuda and configs[0].train.amp
        return cls(models, configs, device, tuple(tta_flips), amp, channels_last)

    @property
    def data_config(self) -> DataConfig:
        return self.configs[0].data

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Mean sigmoid probability over models and views (identity plus each flip, each
        flipped back), as float32 (N, 3, H, W) on the ensemble's device.

        The views go through each model as one batch: one forward pass per model, which keeps
        a GPU busier than a pass per view (and costs the views' activations in memory)."""
        return self.predict_with_presence(images)[0]

    @torch.inference_mode()
    def predict_with_presence(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`predict`, plus the per-slice organ presence probability (N, 3) of the models
        built with an aux head (``model.aux_head``: they return ``(mask_logits,
        presence_logits)``), averaged over those models and the views; None when none has one."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True, memory_format=memory_format)
        views = [()] + [FLIP_DIMS[name] for name in self.tta_flips]
        batch = torch.cat([images.flip(flip) if flip else images for flip in views])
        batch = batch.contiguous(memory_format=memory_format)
        total, presence, with_presence = None, None, 0
        for model in self.models:
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                output = model(batch)
            logits = output
            if isinstance(output, (tuple, list)):
                logits = output[0]
                if len(output) > 1 and output[1] is not None:
                    # A flip leaves "is the organ on this slice" unchanged: mean of the views.
                    views_presence = torch.sigmoid(output[1].float()).chunk(len(views))
                    mean = torch.stack(views_presence).mean(0)
                    presence = mean if presence is None else presence + mean
                    with_presence += 1
            for flip, probs in zip(
                views, torch.sigmoid(logits.float()).chunk(len(views)), strict=True
            ):
                probs = probs.flip(flip) if flip else probs
                total = probs if total is None else total + probs
        mean_presence = None if presence is None else presence / with_presence
        return total / (len(self.models) * len(views)), mean_presence


def params_from_config(
    infer: InferConfig, post: PostprocessConfig | None = None
) -> tuple[ClassPostprocess, ...]:
    """Per-class post-processing from a config: the ``postprocess`` section, with thresholds
    and 2D minimum sizes from ``infer`` where the section leaves them null (older configs)."""
    post = post or PostprocessConfig()
    thresholds = post.thresholds if post.thresholds is not None else infer.thresholds
    min_sizes = (
        post.min_component_size if post.min_component_size is not None else infer.min_component_size
    )
    return tuple(
        ClassPostprocess(
            threshold=float(thresholds[c]),
            min_size=int(min_sizes[c]),
            gate_prob=float(post.gate_prob[c]),
            gate_area=int(post.gate_area[c]),
            gate_cls=float(post.gate_cls[c]),
            fill_gaps=int(post.fill_gaps[c]),
            min_run=int(post.min_run[c]),
            min_volume=int(post.min_volume[c]),
            keep_largest=bool(post.keep_largest[c]),
        )
        for c in range(len(CLASSES))
    )


def _params_from_file(tuned: dict) -> tuple[ClassPostprocess, ...]:
    """A postprocess.json: ``classes`` (one mapping of steps per class name), or the older
    form with only ``thresholds`` and ``min_component_size`` (the other steps then off)."""
    if "classes" in tuned:
        classes = tuned["classes"]
        missing = [name for name in CLASSES if name not in classes]
        if missing:
            raise KeyError(f"classes.{missing[0]}")
        return tuple(ClassPostprocess.from_dict(classes[name]) for name in CLASSES)
    thresholds = [float(v) for v in tuned["thresholds"]]
    min_sizes = [int(v) for v in tuned["min_component_size"]]
    n = len(CLASSES)
    if len(thresholds) != n or not all(0 < t < 1 for t in thresholds):
        raise ValueError(f"'thresholds' must be {n} values in (0, 1), got {thresholds}")
    if len(min_sizes) != n or any(m < 0 for m in min_sizes):
        raise ValueError(f"'min_component_size' must be {n} values >= 0, got {min_sizes}")
    return tuple(
        ClassPostprocess(threshold=t, min_size=m)
        for t, m in zip(thresholds, min_sizes, strict=True)
    )


def load_postprocess(
    runs: Path | None,
    infer: InferConfig,
    post: PostprocessConfig | None = None,
    tuned_file: Path | None = None,
) -> tuple[ClassPostprocess, ...]:
    """Per-class post-processing: the tuned one from ``tuned_file`` (which must exist) or
    ``runs/postprocess.json`` if ``evaluate.py --tune`` wrote it, else the config's
    (:func:`params_from_config`)."""
    if tuned_file is not None:
        path = Path(tuned_file)
        if not path.is_file():
            raise DataError(f"{path}: no such post-processing file (evaluate.py --tune writes one)")
    else:
        path = None if runs is None else Path(runs) / POSTPROCESS_FILE
    if path is None or not path.is_file():
        return params_from_config(infer, post)
    try:
        tuned = json.loads(path.read_text())
        if not isinstance(tuned, dict):
            raise ValueError(f"a JSON object expected, got {type(tuned).__name__}")
        return _params_from_file(tuned)
    except (ValueError, TypeError, KeyError) as err:
        detail = f"no key {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
        raise DataError(
            f"{path}: not a tuned post-processing file ({detail}); delete it or rerun "
            "scripts/evaluate.py --tune"
        ) from None


def predict_slices(
    ensemble: Ensemble,
    table: pd.DataFrame,
    cache: VolumeCache,
    batch_size: int,
    num_workers: int = 0,
    progress: bool = True,
) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
    """Yield ``(id, probabilities, presence)`` for every slice of ``table`` in its order, batch
    by batch: float32 (3, H, W) at the slice's own size, and the aux head's float32 (3,)
    presence probability or None (:meth:`Ensemble.predict_with_presence`)."""
    from gitract.dataset import SliceDataset

    dataset = SliceDataset(table, cache, ensemble.data_config)
    loader = DataLoader(
        dataset,
        batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=ensemble.device.type == "cuda",
    )
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress):
        probs, presence = ensemble.predict_with_presence(batch["image"])
        probs = probs.cpu().numpy()
        presence = None if presence is None else presence.cpu().numpy()
        for k, index in enumerate(batch["index"].tolist()):
            slice_presence = None if presence is None else presence[k]
            yield dataset.ids[index], dataset.letterbox(index).invert(probs[k]), slice_presence


def predict_volumes(
    probs: Iterable[tuple[str, np.ndarray]], case_day_of: dict[str, str]
) -> Iterator[tuple[str, list[str], np.ndarray]]:
    """Group a slice stream (slices of a case-day together, in slice order) into whole
    case-days: ``(case_day, ids, uint8 (D, 3, H, W) quantised probabilities)``."""
    for case_day, group in itertools.groupby(probs, key=lambda item: case_day_of[item[0]]):
        ids, slices = zip(*group, strict=True)
        yield case_day, list(ids), np.stack([quantize(p) for p in slices])


def encode_volume(
    ids: Sequence[str],
    probs: np.ndarray,
    params: Sequence[ClassPostprocess],
    presence: np.ndarray | None = None,
) -> dict[tuple[str, str], str]:
    """Post-process one case-day's quantised probabilities (with the aux head's quantised
    per-slice presence probabilities uint8 (D, 3), when there are some: the ``gate_cls`` step)
    and RLE-encode every slice: ``{(id, class): rle}``."""
    masks = postprocess_volume(probs, params, presence=presence)
    return {
        (slice_id, name): rle_encode(masks[z, c])
        for z, slice_id in enumerate(ids)
        for c, name in enumerate(CLASSES)
    }


def read_sample_submission(path: Path) -> pd.DataFrame:
    """``sample_submission.csv`` checked: columns, known classes, no duplicated rows."""
    frame = read_csv_file(path, ("id", "class"))
    unknown = sorted(set(frame["class"]) - set(CLASSES))
    if unknown:
        line = int(np.flatnonzero(~frame["class"].isin(CLASSES))[0]) + 2
        raise DataError(
            f"{path}: line {line}: unknown class {unknown[0]!r} (expected one of {list(CLASSES)})"
        )
    duplicated = frame.duplicated(["id", "class"])
    if duplicated.any():
        line = int(np.flatnonzero(duplicated)[0]) + 2
        row = frame.iloc[line - 2]
        raise DataError(
            f"{path}: line {line}: duplicated row (id {row['id']}, class {row['class']}); "
            f"{int(duplicated.sum())} duplicates in all"
        )
    return frame


def write_submission(
    sample: pd.DataFrame, predictions: dict[tuple[str, str], str], out: Path
) -> pd.DataFrame:
    """Fill ``sample``'s rows, in its order, and write ``id,class,predicted`` atomically."""
    submission = sample[["id", "class"]].copy()
    submission["predicted"] = [
        predictions[key] for key in zip(submission["id"], submission["class"], strict=True)
    ]
    with atomic_path(out) as tmp:
        submission.to_csv(tmp, index=False)
    return submission


def infer_test(
    cfg: Config,
    data_dir: Path,
    runs: Path | BlendSpec,
    folds: Sequence[int] | None = None,
    out: Path | None = None,
    device: torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
    tuned_file: Path | None = None,
) -> Path:
    """Predict ``data_dir/test`` for the rows of ``data_dir/sample_submission.csv``.

    ``runs``: one runs folder (its folds, with ``cfg.infer``'s TTA and batch size), or a
    :class:`~gitract.blend.BlendSpec` (each member with its own config's TTA and batch size,
    probabilities averaged with the weights on each slice's own grid). The volume cache goes
    to ``cfg.data.cache_dir``.

    Post-processing: ``tuned_file``, else ``postprocess.json`` in the runs folder (the blend's
    folder for a blend), else ``cfg``'s (``postprocess`` section, thresholds from ``infer``
    where it has none).

    An empty sample submission (Kaggle's public re-run, where ``test/`` is empty) gives a
    header-only submission at once, without loading any model."""
    out = Path(out) if out is not None else default_output_path()
    sample_path = data_dir / "sample_submission.csv"
    sample = read_sample_submission(sample_path)
    if sample.empty:
        write_submission(sample, {}, out)
        return out
    from gitract.blend import BlendSpec, MemberSpec, blend_days, load_member  # see the top

    images = scan_images(data_dir / "test")
    wanted = sample["id"].drop_duplicates()
    missing = wanted[~wanted.isin(images["id"])]
    if len(missing):
        raise DataError(
            f"{sample_path}: {len(missing)} id(s) have no image under {data_dir / 'test'}, "
            f"e.g. {', '.join(missing.iloc[:3])}"
        )
    # Whole case-days go into the cache: a 2.5D sample needs its neighbours too.
    days = images.loc[images["id"].isin(wanted), "case_day"].unique()
    table = images[images["case_day"].isin(days)]
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(runs, BlendSpec):
        members = [
            load_member(spec, device, folds, num_workers=num_workers) for spec in runs.members
        ]
        folder = runs.dir
    else:
        single = MemberSpec(Path(runs), 1.0)
        infer = cfg.infer
        members = [
            load_member(single, device, folds, infer.tta_flips, infer.batch_size, num_workers)
        ]
        folder = Path(runs)
    params = load_postprocess(folder, cfg.infer, cfg.postprocess, tuned_file)
    cache = VolumeCache(table, cfg.data.cache_dir, with_masks=False, progress=progress)
    # Slice order within each case-day: the 3D steps see the volume as the metric stacks it.
    targets = table[table["id"].isin(wanted)].sort_values(["case", "day", "slice"], kind="stable")
    predictions: dict[tuple[str, str], str] = {}
    for day in blend_days(members, targets, cache, progress):
        presence = None if day.presence is None else quantize(day.presence)
        predictions.update(encode_volume(day.ids, quantize(day.probs), params, presence))
    write_submission(sample, predictions, out)
    return out


def _save_volume_probs(
    folder: Path,
    case_day: str,
    ids: list[str],
    stacked: np.ndarray,
    presence: np.ndarray | None = None,
) -> None:
    """One case-day's quantised probabilities, uint8 (D, 3, H, W), in a compressed .npz, with
    the quantised per-slice presence probabilities uint8 (D, 3) as ``presence`` when there are
    some (what gitract.tuning reads for the ``gate_cls`` step)."""
    extra = {} if presence is None else {"presence": presence}
    # The temp name does not end in .npz: a leftover is never taken for a volume by the tuner.
    with atomic_path(folder / f"{case_day}.npz") as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, probs=stacked, ids=np.asarray(ids), **extra)


def infer_oof(
    cfg: Config,
    data_dir: Path,
    runs: Path | BlendSpec,
    folds_csv: Path,
    folds: Sequence[int] | None = None,
    out: Path | None = None,
    device: torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> Path:
    """Out-of-fold predictions: fold N's validation slices by fold N's model alone (for a
    blend, by every member's fold-N model, blended as on the test set).

    Writes an ``id,class,predicted`` CSV (default ``<folder>/oof.csv``) and each case-day's
    probabilities under ``<folder>/oof_probs/``, which ``evaluate.py --tune`` searches;
    ``<folder>`` is the runs folder, or the blend's folder."""
    from gitract.blend import BlendSpec, MemberSpec, blend_days, load_member  # see the top
    from gitract.folds import load_folds  # sklearn: imported only when OOF needs it

    table = load_folds(folds_csv, load_train_table(data_dir, cfg.data.exclude))
    known = sorted(table["fold"].unique().tolist())
    folds = list(folds) if folds else known
    unknown = [f for f in folds if f not in known]
    if unknown:
        raise DataError(f"{folds_csv}: there is no fold {unknown[0]}; its folds are {known}")
    if isinstance(runs, BlendSpec):
        specs, folder, own = list(runs.members), runs.dir, True
    else:
        specs, folder, own = [MemberSpec(Path(runs), 1.0)], Path(runs), False
    for spec in specs:  # every checkpoint there, before any work
        for fold in folds:
            find_checkpoints(spec.run, [fold])
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Always the config's post-processing, never the tuned one: thresholds tuned on these very
    # predictions would make the OOF score optimistic (evaluate.py --tune reports that score).
    params = params_from_config(cfg.infer, cfg.postprocess)
    # The training cache has the masks too; reusing it avoids decoding the PNGs again.
    cache = VolumeCache(table, cfg.data.cache_dir, with_masks=True, progress=progress)
    probs_dir = folder / OOF_PROBS_DIR
    probs_dir.mkdir(parents=True, exist_ok=True)
    table = table.sort_values(["case", "day", "slice"], kind="stable")
    predictions: dict[tuple[str, str], str] = {}
    for fold in folds:
        if own:  # a blend: each member with its own config's TTA and batch size
            members = [load_member(s, device, [fold], num_workers=num_workers) for s in specs]
        else:
            members = [
                load_member(
                    specs[0], device, [fold], cfg.infer.tta_flips, cfg.infer.batch_size,
                    num_workers,
                )
            ]  # fmt: skip
        val = table[table["fold"] == fold]
        # Slices arrive in slice order, one case-day after the other: each day's probabilities
        # are saved, then encoded, then dropped, so memory holds one volume at a time.
        for day in blend_days(members, val, cache, progress):
            volume = quantize(day.probs)
            presence = None if day.presence is None else quantize(day.presence)
            _save_volume_probs(probs_dir, day.case_day, day.ids, volume, presence)
            predictions.update(encode_volume(day.ids, volume, params, presence))
    rows = table[table["fold"].isin(folds)]
    sample = pd.DataFrame(
        [(i, name) for i in rows["id"] for name in CLASSES], columns=["id", "class"]
    )
    out = out or folder / "oof.csv"
    write_submission(sample, predictions, out)
    return out
