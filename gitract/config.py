"""Typed run configuration: YAML file + ``--set section.key=value`` overrides -> :class:`Config`.

Why dataclasses and a hand-written checker instead of a free-form dict: a typo such as
``train.epoch: 3`` must stop the run at once with the key and file named, not be silently ignored
for nine GPU hours. Every value read from YAML, from an override or from a checkpoint goes through
the same type and range checks (:func:`config_from_dict`), so a config that loads is one that the
rest of the pipeline can trust. The dataclass defaults are ``configs/default.yaml``'s values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from gitract.atomic import write_text_atomic
from gitract.errors import ConfigError

__all__ = [
    "CONFIG_DIR",
    "DEFAULT_CONFIG",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "InferConfig",
    "PostprocessConfig",
    "Config",
    "load_config",
    "config_to_dict",
    "config_from_dict",
    "save_config",
]

#: ``configs/`` of the source tree (the package is installed editable).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"

ResizeMode = Literal["pad", "resize"]
Flip = Literal["hflip", "vflip"]
AmpDtype = Literal["fp16", "bf16"]
SelectBy = Literal["score", "dice"]
MetricProfile = Literal["kaggle", "mlebench"]
ModelKind = Literal["2.5d", "3d"]
TrainSlices = Literal["all", "positive"]


@dataclass
class DataConfig:
    """Where the data is and how a 2.5D network input is cut from it."""

    root: str | None = None  # None: --data-dir > $GITRACT_DATA_DIR > Kaggle input > synthetic
    exclude: list[str] = field(default_factory=lambda: ["case7_day0", "case81_day30"])
    folds_csv: str = "folds/folds.csv"
    n_slices: int = 3  # input channels: slices z - k*stride .. z + k*stride
    slice_stride: int = 2
    img_size: list[int] = field(default_factory=lambda: [320, 384])  # (H, W), multiples of 32
    resize_mode: ResizeMode = "pad"
    num_workers: int | None = None  # None: suited to the machine (resolve_num_workers)
    cache_dir: str | None = None
    z_channel: bool = False  # 2.5D: add the slice's relative position (index / depth) as a channel
    train_slices: TrainSlices = "all"  # 2.5D: "positive" trains on slices with an organ only
    grid_hw: list[int] = field(default_factory=lambda: [256, 256])  # 3D: in-plane grid (H, W)
    patch_size: list[int] = field(default_factory=lambda: [80, 160, 160])  # 3D: (D, H, W)

    @property
    def in_channels(self) -> int:
        """The network's input channels: the 2.5D slices, plus the z-channel if asked."""
        return self.n_slices + int(self.z_channel)


@dataclass
class ModelConfig:
    """Any smp architecture and encoder; ``encoder_weights`` is a name, a local file or None."""

    kind: ModelKind = "2.5d"  # "3d": a MONAI network on whole case-day volumes
    arch: str = "Unet"  # 2.5D: an smp architecture; 3D: SegResNet
    encoder_name: str = "efficientnet-b7"  # 2.5D only
    encoder_weights: str | None = "imagenet"  # 2.5D only
    aux_head: bool = False  # 2.5D: a per-slice "organ present" head (smp aux_params)
    init_filters: int = 16  # 3D: width of the first SegResNet block


@dataclass
class TrainConfig:
    """Optimiser, schedule, loss, augmentation probabilities and output folder of one fold."""

    epochs: int = 15
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-2
    warmup_epochs: int = 1
    min_lr: float = 1e-6
    amp: bool = True
    seed: int = 42
    bce_weight: float = 0.5
    dice_weight: float = 0.5
    grad_clip: float | None = 1.0
    threshold: float = 0.5
    aug_hflip: float = 0.5
    aug_vflip: float = 0.0
    aug_ssr: float = 0.5
    aug_distort: float = 0.25
    aug_brightness: float = 0.5
    out_dir: str = "runs"
    channels_last: bool = True
    amp_dtype: AmpDtype = "fp16"
    accumulate: int = 1  # optimizer step every N batches (effective batch N x batch_size)
    compile: bool = False  # torch.compile the network
    max_bad_steps: int = 20  # stop after this many consecutive non-finite steps
    select_by: SelectBy = "score"  # what best.pt follows: competition score or mean Dice
    select_metric: MetricProfile = "kaggle"  # the score's profile when select_by is score
    aux_weight: float = 0.2  # weight of the aux head's BCE on slice presence
    ema_decay: float | None = None  # EMA of the weights (validation and best.pt use it); null: off


@dataclass
class InferConfig:
    """Batch size, flip TTA and per-class post-processing of the submission."""

    batch_size: int = 32
    tta_flips: list[Flip] = field(default_factory=lambda: ["hflip"])
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    min_component_size: list[int] = field(default_factory=lambda: [0, 0, 0])
    out: str | None = None
    sw_overlap: float = 0.5  # 3D: sliding-window overlap
    sw_batch_size: int = 4  # 3D: windows per forward pass


@dataclass
class PostprocessConfig:
    """Per-class post-processing of a whole case-day (gitract.postprocess), one value per class
    in CLASSES order; every step is off unless set here or tuned (runs/<name>/postprocess.json
    from ``evaluate.py --tune`` wins over this section). ``thresholds`` and
    ``min_component_size`` left null fall back to infer's (configs written before this section).
    """

    thresholds: list[float] | None = None
    min_component_size: list[int] | None = None
    gate_prob: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    gate_area: list[int] = field(default_factory=lambda: [0, 0, 0])
    gate_cls: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    fill_gaps: list[int] = field(default_factory=lambda: [0, 0, 0])
    min_run: list[int] = field(default_factory=lambda: [0, 0, 0])
    min_volume: list[int] = field(default_factory=lambda: [0, 0, 0])
    keep_largest: list[bool] = field(default_factory=lambda: [False, False, False])


@dataclass
class Config:
    """A whole run: ``name`` names the run folder ``<out_dir>/<name>/fold<N>``."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    name: str = "default"


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "infer": InferConfig,
    "postprocess": PostprocessConfig,
}
_TOP_KEYS = [*_SECTIONS, "name"]
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


# --------------------------------------------------------------------------- type checking


def _type_name(tp: Any) -> str:
    """Readable name of a field type for error messages: ``float | None``, ``list[int]``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Return ``value`` checked against ``tp`` (int -> float widened), else raise ConfigError.

    bool is not accepted as an int or float (YAML ``yes``/``true`` in a numeric field is a
    mistake); None only where the type is Optional; lists are checked element by element.
    """

    def fail() -> typing.NoReturn:
        raise ConfigError(
            f"{where}: '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )

    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                pass
        fail()
    if origin is Literal:
        if isinstance(value, str) and value in typing.get_args(tp):
            return value
        fail()
    if origin is list:
        if not isinstance(value, (list, tuple)):
            fail()
        (elem,) = typing.get_args(tp)
        return [_coerce(v, elem, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML (YAML 1.1) reads "1e-3" (no dot) as a string: accept a numeric literal.
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        fail()
    raise TypeError(f"unsupported config field type {tp!r}")  # programming error, not user's


def _unknown_key(where: str, key: str, known: Sequence[str], prefix: str = "") -> ConfigError:
    """ConfigError for a key that is not a field, with the closest field as a suggestion."""
    msg = f"{where}: unknown key '{prefix}{key}'"
    close = difflib.get_close_matches(str(key), list(known), n=1)
    if close:
        msg += f" (did you mean '{prefix}{close[0]}'?)"
    else:
        msg += f" (known: {', '.join(known)})"
    return ConfigError(msg)


def _build_section(cls: type, values: Any, section: str, where: str) -> Any:
    """Instantiate one section dataclass from a mapping; unset fields keep their defaults."""
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{where}: section '{section}' must be a mapping of key: value, "
            f"got {type(values).__name__}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown_key(where, key, names, prefix=f"{section}.")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}", where)
    return cls(**kwargs)


# --------------------------------------------------------------------------- value checks


def _check_values(cfg: Config, where: str) -> None:
    """Range checks that the type system cannot express; raise ConfigError naming the key."""

    def bad(key: str, rule: str, value: Any) -> ConfigError:
        return ConfigError(f"{where}: '{key}' must be {rule}, got {value!r}")

    d, t, i = cfg.data, cfg.train, cfg.infer
    if not cfg.name or not re.fullmatch(r"[A-Za-z0-9._+-]+", cfg.name):
        raise bad("name", "a non-empty folder name (letters, digits, . _ + -)", cfg.name)
    if d.n_slices < 1 or d.n_slices % 2 == 0:
        raise bad("data.n_slices", "an odd integer >= 1", d.n_slices)
    if d.slice_stride < 1:
        raise bad("data.slice_stride", ">= 1", d.slice_stride)
    if len(d.img_size) != 2 or any(s <= 0 or s % 32 for s in d.img_size):
        raise bad("data.img_size", "[H, W], two positive multiples of 32", d.img_size)
    if d.num_workers is not None and d.num_workers < 0:
        raise bad("data.num_workers", ">= 0 or null (suited to the machine)", d.num_workers)
    for key, value in (
        ("train.epochs", t.epochs),
        ("train.batch_size", t.batch_size),
        ("train.accumulate", t.accumulate),
        ("train.max_bad_steps", t.max_bad_steps),
    ):
        if value < 1:
            raise bad(key, ">= 1", value)
    if i.batch_size < 1:
        raise bad("infer.batch_size", ">= 1", i.batch_size)
    _check_ensemble_keys(cfg, bad)
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise bad("train.lr", "> 0", t.lr)
    if not (0 <= t.min_lr <= t.lr):
        raise bad("train.min_lr", f"in [0, train.lr = {t.lr}]", t.min_lr)
    for key in ("weight_decay", "bce_weight", "dice_weight", "warmup_epochs"):
        value = getattr(t, key)
        if not (value >= 0 and math.isfinite(value)):
            raise bad(f"train.{key}", ">= 0", value)
    if t.bce_weight + t.dice_weight <= 0:
        raise bad("train.dice_weight", "> 0 when train.bce_weight is 0", t.dice_weight)
    if t.grad_clip is not None and not t.grad_clip > 0:
        raise bad("train.grad_clip", "> 0 or null (no clipping)", t.grad_clip)
    if not 0 < t.threshold < 1:
        raise bad("train.threshold", "in (0, 1)", t.threshold)
    for f in dataclasses.fields(t):
        if f.name.startswith("aug_") and not 0 <= getattr(t, f.name) <= 1:
            raise bad(f"train.{f.name}", "a probability in [0, 1]", getattr(t, f.name))
    if len(set(i.tta_flips)) != len(i.tta_flips):
        raise bad("infer.tta_flips", "a list without repeats", i.tta_flips)
    if len(i.thresholds) != 3 or not all(0 < v < 1 for v in i.thresholds):
        raise bad("infer.thresholds", "3 values in (0, 1), one per class", i.thresholds)
    if len(i.min_component_size) != 3 or any(v < 0 for v in i.min_component_size):
        raise bad("infer.min_component_size", "3 values >= 0, one per class", i.min_component_size)
    _check_postprocess(cfg.postprocess, bad)


def _check_ensemble_keys(cfg: Config, bad: Any) -> None:
    """The 3D model's, the aux head's and EMA's keys."""
    d, m, t, i = cfg.data, cfg.model, cfg.train, cfg.infer
    if len(d.grid_hw) != 2 or any(v < 8 for v in d.grid_hw):
        raise bad("data.grid_hw", "[H, W], two integers >= 8", d.grid_hw)
    if len(d.patch_size) != 3 or any(v < 8 or v % 8 for v in d.patch_size):
        raise bad("data.patch_size", "[D, H, W], three positive multiples of 8", d.patch_size)
    if m.init_filters < 1:
        raise bad("model.init_filters", ">= 1", m.init_filters)
    if m.kind == "3d" and m.aux_head:
        raise bad("model.aux_head", "false for a 3D model (a 2.5D option)", m.aux_head)
    if not (t.aux_weight >= 0 and math.isfinite(t.aux_weight)):
        raise bad("train.aux_weight", ">= 0", t.aux_weight)
    if t.ema_decay is not None and not 0 < t.ema_decay < 1:
        raise bad("train.ema_decay", "in (0, 1) or null (no EMA)", t.ema_decay)
    if not 0 <= i.sw_overlap < 1:
        raise bad("infer.sw_overlap", "in [0, 1)", i.sw_overlap)
    if i.sw_batch_size < 1:
        raise bad("infer.sw_batch_size", ">= 1", i.sw_batch_size)


def _check_postprocess(p: PostprocessConfig, bad: Any) -> None:
    """The postprocess section: 3 values per key, each in its step's range."""
    rules = {
        "thresholds": ("3 values in (0, 1), one per class", lambda v: 0 < v < 1),
        "min_component_size": ("3 values >= 0, one per class", lambda v: v >= 0),
        "gate_prob": ("3 values in [0, 1], one per class", lambda v: 0 <= v <= 1),
        "gate_cls": ("3 values in [0, 1], one per class", lambda v: 0 <= v <= 1),
        "gate_area": ("3 values >= 0, one per class", lambda v: v >= 0),
        "fill_gaps": ("3 values >= 0, one per class", lambda v: v >= 0),
        "min_run": ("3 values >= 0, one per class", lambda v: v >= 0),
        "min_volume": ("3 values >= 0, one per class", lambda v: v >= 0),
        "keep_largest": ("3 values true/false, one per class", lambda v: True),
    }
    for key, (rule, ok) in rules.items():
        values = getattr(p, key)
        if values is not None and (len(values) != 3 or not all(ok(v) for v in values)):
            raise bad(f"postprocess.{key}", rule, values)


# --------------------------------------------------------------------------- public API


def config_from_dict(
    d: Mapping[str, Any], name: str | None = None, *, source: str = "config"
) -> Config:
    """Build and validate a Config from a nested dict (YAML or a checkpoint's ``config``).

    ``name`` wins over ``d["name"]``; with neither the name is ``"default"``. ``source`` is what
    error messages name (a file, ``--set ...``, a checkpoint).
    """
    if not isinstance(d, Mapping):
        raise ConfigError(
            f"{source}: a config must be a mapping of sections, got {type(d).__name__}"
        )
    for key in d:
        if key not in _TOP_KEYS:
            raise _unknown_key(source, key, _TOP_KEYS)
    sections = {s: _build_section(cls, d.get(s), s, source) for s, cls in _SECTIONS.items()}
    if name is None:
        name = d.get("name", "default")
    if not isinstance(name, str):
        raise ConfigError(f"{source}: 'name' must be str, got {name!r} ({type(name).__name__})")
    cfg = Config(**sections, name=name)
    _check_values(cfg, source)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (name first, then the sections): what YAML and checkpoints store."""
    out: dict[str, Any] = {"name": cfg.name}
    for section in _SECTIONS:
        out[section] = dataclasses.asdict(getattr(cfg, section))
    return out


def _parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.epochs=3"`` -> (["train", "epochs"], 3); the value is parsed as YAML."""
    where = f"--set {text}"
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not (parts == ["name"] or (len(parts) == 2 and all(parts))):
        raise ConfigError(f"{where}: expected section.key=value, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: value is not valid YAML ({e.__class__.__name__})") from e
    return parts, value


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config, apply ``--set section.key=value`` overrides, validate everything.

    The run name is the YAML's top-level ``name`` or else the file's stem (``demo_cpu``).
    Unknown sections/keys, wrong types and out-of-range values raise ConfigError naming the
    file (or the override) and the key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or e.__class__.__name__
        raise ConfigError(f"{path}: invalid YAML{at}: {problem}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    source = str(path)
    merged = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    merged.setdefault("name", path.stem)
    # Validate the file alone first, so its own errors name the file and not an override.
    config_from_dict(merged, source=source)
    for text_ in overrides:
        parts, value = _parse_override(text_)
        where = f"--set {text_}"
        if parts == ["name"]:
            if not isinstance(value, str):
                raise ConfigError(f"{where}: 'name' must be str, got {value!r}")
            merged["name"] = value
            continue
        section, key = parts
        if section not in _SECTIONS:
            raise _unknown_key(where, section, list(_SECTIONS))
        hints = typing.get_type_hints(_SECTIONS[section])
        if key not in hints:
            raise _unknown_key(where, key, list(hints), prefix=f"{section}.")
        # Types are checked per override (the error names it); ranges once at the end, since
        # only the final combination must be consistent (train.lr=1e-7 then train.min_lr=0).
        value = _coerce(value, hints[key], f"{section}.{key}", where)
        if not isinstance(merged.get(section), dict):
            merged[section] = {}
        merged[section][key] = value
    if overrides:
        source = f"{source} with --set {' '.join(overrides)}"
    return config_from_dict(merged, source=source)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically (temp file in the same folder, then ``os.replace``)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    write_text_atomic(path, text)
