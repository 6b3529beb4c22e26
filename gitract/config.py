"""Typed run configuration: YAML file + ``--set section.key=value`` overrides -> :class:`Config`.

A typo such as ``train.epoch: 3`` must stop the run at once with the key and file named, not be
silently ignored for nine GPU hours. The sections are pydantic models with unknown keys
forbidden and strict types (no ``"15"`` for an int, no ``true`` for a number); the range rules
sit beside each field. Every value read from YAML, from an override or from a checkpoint goes
through the same model (:func:`config_from_dict`), and pydantic's errors are reworded into one
line naming the source and the key. The defaults are ``configs/default.yaml``'s values.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from gitract.atomic import write_text_atomic
from gitract.errors import ConfigError

__all__ = [
    "CONFIG_DIR",
    "LEVELS_3D",
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "InferConfig",
    "ClassPostprocess",
    "PostprocessConfig",
    "Config",
    "load_config",
    "config_to_dict",
    "config_from_dict",
    "save_config",
    "one_line_error",
]

#: ``configs/`` of the source tree (the package is installed editable).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _yaml_float(value: Any) -> Any:
    """PyYAML (YAML 1.1) reads ``1e-3`` (no dot) as a string: take a numeric literal as a float."""
    if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)
    return value


def _rule(text: str, ok: Callable[[Any], bool]) -> AfterValidator:
    """A range rule: ``text`` completes the error "'key' must be ..." when ``ok(value)`` fails."""

    def check(value: Any) -> Any:
        if value is not None and not ok(value):
            raise PydanticCustomError("rule", text)
        return value

    return AfterValidator(check)


Float = Annotated[float, BeforeValidator(_yaml_float)]
AtLeast1 = Annotated[int, _rule(">= 1", lambda v: v >= 1)]
Count = Annotated[int, _rule(">= 0", lambda v: v >= 0)]
NonNegative = Annotated[Float, _rule(">= 0", lambda v: v >= 0 and math.isfinite(v))]
Probability = Annotated[Float, _rule("a probability in [0, 1]", lambda v: 0 <= v <= 1)]
Unit = Annotated[Float, _rule("in (0, 1)", lambda v: 0 < v < 1)]
Flip = Literal["hflip", "vflip"]
OddCount = Annotated[int, _rule("an odd integer >= 1", lambda v: v >= 1 and v % 2 == 1)]
ImageSize = Annotated[
    list[int],
    _rule(
        "[H, W], two positive multiples of 32",
        lambda v: len(v) == 2 and all(s > 0 and s % 32 == 0 for s in v),
    ),
]
GridSize = Annotated[
    list[int], _rule("[H, W], two integers >= 8", lambda v: len(v) == 2 and min(v) >= 8)
]
PatchSize = Annotated[
    list[int],
    _rule(
        "[D, H, W], three positive multiples of 8",
        lambda v: len(v) == 3 and all(s >= 8 and s % 8 == 0 for s in v),
    ),
]
FolderName = Annotated[
    str,
    _rule(
        "a non-empty folder name (letters, digits, . _ + -)",
        lambda v: re.fullmatch(r"[A-Za-z0-9._+-]+", v) is not None,
    ),
]


class _Section(BaseModel):
    """Unknown keys and loose types are errors, in every section."""

    model_config = ConfigDict(extra="forbid", strict=True)


class DataConfig(_Section):
    """Where the data is and how a network input is cut from it."""

    root: str | None = None  # None: --data-dir > $GITRACT_DATA_DIR > Kaggle input > synthetic
    exclude: list[str] = ["case7_day0", "case81_day30"]
    folds_csv: str = "folds/folds.csv"
    n_slices: OddCount = 3  # 2.5D channels: slices z - k*stride .. z + k*stride
    slice_stride: AtLeast1 = 2
    img_size: ImageSize = [320, 384]  # (H, W)
    resize_mode: Literal["pad", "resize"] = "pad"
    # 2.5D: train on random (H, W) windows of the canvas; validation and inference keep the
    # whole canvas (null: train on the whole canvas too)
    train_crop: Annotated[
        list[int] | None,
        _rule(
            "null or [H, W], two positive multiples of 32 (the U-Net halves the size 5 times)",
            lambda v: len(v) == 2 and all(s > 0 and s % 32 == 0 for s in v),
        ),
    ] = None
    num_workers: Annotated[
        int | None, _rule(">= 0 or null (suited to the machine)", lambda v: v >= 0)
    ] = None
    cache_dir: str | None = None
    z_channel: bool = False  # 2.5D: add the slice's relative position (index / depth) as a channel
    train_slices: Literal["all", "positive"] = "all"  # 2.5D: "positive": slices with an organ
    grid_hw: GridSize = [256, 256]  # 3D: in-plane grid (H, W)
    patch_size: PatchSize = [80, 160, 160]  # 3D: (D, H, W)

    @field_validator("train_crop")
    @classmethod
    def _crop_within_canvas(cls, value: list[int] | None, info: ValidationInfo) -> Any:
        """A crop is a window of the canvas: no side may exceed data.img_size's."""
        canvas = info.data.get("img_size")
        if value is not None and canvas is not None and any(map(lambda c, s: c > s, value, canvas)):
            raise PydanticCustomError(
                "rule", "null or [H, W] within data.img_size {canvas}", {"canvas": canvas}
            )
        return value

    @property
    def in_channels(self) -> int:
        """The network's input channels: the 2.5D slices, plus the z-channel if asked."""
        return self.n_slices + int(self.z_channel)


class ModelConfig(_Section):
    """Any smp architecture and encoder; ``encoder_weights`` is a name, a local file or None."""

    arch: str = "Unet"  # 2.5D: an smp architecture; 3D: SegResNet or UNet (MONAI)
    encoder_name: str = "efficientnet-b7"  # 2.5D only
    encoder_weights: str | None = "imagenet"  # 2.5D only
    kind: Literal["2.5d", "3d"] = "2.5d"  # "3d": a MONAI network on whole case-day volumes
    aux_head: bool = False  # 2.5D: a per-slice "organ present" head (smp aux_params)
    init_filters: AtLeast1 = 16  # 3D: width of the first SegResNet block
    # 3D: the network's normalisation and activation; null: its own (SegResNet: GroupNorm of 8
    # groups, ReLU; UNet: InstanceNorm, PReLU). 2.5D encoders bring their own.
    norm: Literal["group", "batch", "instance"] | None = None
    act: Literal["relu", "prelu"] | None = None

    @field_validator("aux_head")
    @classmethod
    def _aux_head_is_2d(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("kind") == "3d":
            raise PydanticCustomError("rule", "false for a 3D model (a 2.5D option)")
        return value

    @field_validator("norm", "act")
    @classmethod
    def _layers_are_3d(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("kind") != "3d":
            raise PydanticCustomError(
                "rule", "null for a 2.5D model (a 3D option; smp encoders bring their own)"
            )
        return value

    def norm_3d(self) -> str:
        """The 3D network's normalisation: ``norm``, or the network's own when null."""
        return self.norm or ("instance" if self.arch.lower() == "unet" else "group")


class TrainConfig(_Section):
    """Optimiser, schedule, loss, augmentation probabilities and output folder of one fold."""

    epochs: AtLeast1 = 15
    batch_size: AtLeast1 = 16
    lr: Annotated[Float, _rule("> 0", lambda v: v > 0 and math.isfinite(v))] = 2e-3
    weight_decay: NonNegative = 1e-2
    warmup_epochs: Count = 1
    min_lr: NonNegative = 1e-6
    amp: bool = True
    seed: int = 42
    bce_weight: NonNegative = 0.5
    dice_weight: NonNegative = 0.5
    grad_clip: Annotated[Float | None, _rule("> 0 or null (no clipping)", lambda v: v > 0)] = 1.0
    threshold: Unit = 0.5
    aug_hflip: Probability = 0.5
    aug_vflip: Probability = 0.0
    aug_ssr: Probability = 0.5
    aug_distort: Probability = 0.25
    aug_brightness: Probability = 0.5
    out_dir: str = "runs"
    channels_last: bool = True
    amp_dtype: Literal["fp16", "bf16"] = "fp16"
    accumulate: AtLeast1 = 1  # optimizer step every N batches (effective batch N x batch_size)
    compile: bool = False  # torch.compile the network
    max_bad_steps: AtLeast1 = 20  # stop after this many consecutive non-finite steps
    select_by: Literal["score", "dice"] = "score"  # what best.pt follows
    val_every: AtLeast1 = 1  # validate every N epochs, and after the last
    select_metric: Literal["kaggle", "mlebench"] = "kaggle"  # the score's profile
    aux_weight: NonNegative = 0.2  # weight of the aux head's BCE on slice presence
    # EMA of the weights (validation and best.pt use it); null: off
    ema_decay: Annotated[Float | None, _rule("in (0, 1) or null", lambda v: 0 < v < 1)] = None

    @field_validator("min_lr")
    @classmethod
    def _min_lr_below_lr(cls, value: float, info: ValidationInfo) -> float:
        lr = info.data.get("lr")
        if lr is not None and value > lr:
            raise PydanticCustomError("rule", "in [0, train.lr = {lr}]", {"lr": lr})
        return value

    @field_validator("dice_weight")
    @classmethod
    def _some_loss(cls, value: float, info: ValidationInfo) -> float:
        if value + info.data.get("bce_weight", 1.0) <= 0:
            raise PydanticCustomError("rule", "> 0 when train.bce_weight is 0")
        return value


class InferConfig(_Section):
    """Batch size, flip TTA and output of the submission (post-processing: its own section)."""

    batch_size: AtLeast1 = 32
    tta_flips: Annotated[
        list[Flip], _rule("a list without repeats", lambda v: len(set(v)) == len(v))
    ] = ["hflip"]
    out: str | None = None
    sw_overlap: Annotated[Float, _rule("in [0, 1)", lambda v: 0 <= v < 1)] = 0.5  # 3D
    sw_batch_size: AtLeast1 = 4  # 3D: windows per forward pass


def _plain(value: Any) -> Any:
    """A numpy scalar (a tuning grid from np.linspace) as its plain value, so the rules and
    their messages see 1.5 and not np.float64(1.5) (and strict ints take np.int64)."""
    return value.item() if type(value).__module__ == "numpy" and hasattr(value, "item") else value


_Plain = BeforeValidator(_plain)
StepUnit = Annotated[Float, _Plain, _rule("in (0, 1)", lambda v: 0 < v < 1)]
StepProbability = Annotated[Float, _Plain, _rule("in [0, 1]", lambda v: 0 <= v <= 1)]
StepCount = Annotated[int, _Plain, _rule("an integer >= 0", lambda v: v >= 0)]


class ClassPostprocess(_Section):
    """One class's post-processing of a whole case-day (gitract.postprocess.steps, where each
    field's step is described); the defaults switch every step but the threshold off. One
    schema: the config's ``postprocess.<class>``, a class of ``postprocess.json`` and the
    tuner's candidate. A new step is one field here, its function in steps.py and its grid
    values in tuning.py."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    threshold: StepUnit = 0.5  # 1. pixel threshold, p > threshold
    min_size: StepCount = 0  # 2. drop 2D components of fewer pixels
    gate_prob: StepProbability = 0.0  # 3. keep a slice only if its max probability >= this
    gate_area: StepCount = 0  # ... and its predicted area >= this (pixels)
    gate_cls: StepProbability = 0.0  # ... and its aux head's presence probability >= this
    fill_gaps: StepCount = 0  # 4. fill gaps of <= k slices in the presence flags
    min_run: StepCount = 0  # ... then drop runs of fewer slices
    min_volume: StepCount = 0  # 5. drop 3D components of fewer voxels
    keep_largest: bool = False  # ... or keep only the largest one

    def __init__(self, **values: Any) -> None:
        """A bad value is a one-line ValueError ("min_run must be an integer >= 0, got -1").
        pydantic calls this for a nested class too: the config or postprocess.json that holds
        it then words the error with the whole key (see ``_unwrap``)."""
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise _StepError(e.errors()[0]) from None


class _StepError(ValueError):
    """A ClassPostprocess's first error, worded on its own and kept for a nesting model."""

    def __init__(self, error: ErrorDetails) -> None:
        super().__init__(_message(error, ClassPostprocess, quote=""))
        self.error = error


class PostprocessConfig(_Section):
    """Per-class post-processing (:class:`ClassPostprocess`), one field per class in CLASSES
    order; every step is off unless set here or tuned (``runs/<name>/postprocess.json`` from
    ``evaluate.py --tune``, the same schema, wins over this section)."""

    large_bowel: ClassPostprocess = Field(default_factory=ClassPostprocess)
    small_bowel: ClassPostprocess = Field(default_factory=ClassPostprocess)
    stomach: ClassPostprocess = Field(default_factory=ClassPostprocess)

    def per_class(self) -> tuple[ClassPostprocess, ...]:
        """The classes' settings in CLASSES order (what postprocess_volume takes)."""
        return (self.large_bowel, self.small_bowel, self.stomach)


#: The 3D networks (matched case-insensitively) and their stride-2 levels: every patch and
#: window side must be a multiple of 2 ** levels, or the skip connections would not line up.
LEVELS_3D = {"segresnet": 3, "unet": 4}


class Config(_Section):
    """A whole run: ``name`` names the run folder ``<out_dir>/<name>/fold<N>``."""

    name: FolderName = "default"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    postprocess: PostprocessConfig = Field(default_factory=PostprocessConfig)

    @model_validator(mode="after")
    def _fits_the_3d_network(self) -> Config:
        """The rules between sections of a 3D recipe."""
        model, data = self.model, self.data
        if model.kind != "3d":
            return self
        if data.train_crop is not None:
            raise PydanticCustomError(
                "text", "data.train_crop: a 2.5D option (a 3D model trains on data.patch_size "
                "patches), got {crop}; set it to null", {"crop": data.train_crop},
            )  # fmt: skip
        patch, grid = list(data.patch_size), list(data.grid_hw)
        if patch[1] > grid[0] or patch[2] > grid[1]:
            raise PydanticCustomError(
                "text", "data.patch_size: the patch's in-plane size {inplane} must fit in "
                "data.grid_hw {grid}", {"inplane": patch[1:], "grid": grid},
            )  # fmt: skip
        levels = LEVELS_3D.get(model.arch.lower())
        if levels is None:  # an unknown network: named where it is built, with a suggestion
            return self
        if any(s % 2**levels for s in patch):
            raise PydanticCustomError(
                "text", "data.patch_size: must be [D, H, W], three positive multiples of "
                "{multiple} for model.arch {arch}, got {patch}",
                {"multiple": 2**levels, "arch": model.arch, "patch": patch},
            )  # fmt: skip
        filters = model.init_filters
        if model.norm_3d() == "group" and filters % 8:
            raise PydanticCustomError(
                "text", "model.init_filters: {arch} needs a multiple of 8 (GroupNorm of 8 "
                "groups; model.norm batch or instance takes any width), got {filters}",
                {"arch": model.arch, "filters": filters},
            )  # fmt: skip
        return self


_SECTIONS = [name for name in Config.model_fields if name != "name"]

# --------------------------------------------------------------------------- error messages


def _type_name(tp: Any) -> str:
    """Readable name of a field type for error messages: ``float | None``, ``list[int]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _field_type(loc: tuple[int | str, ...], root: type[BaseModel] = Config) -> Any:
    """The declared type at ``loc`` of ``root`` (``("data", "img_size", 1)`` -> ``int``)."""
    tp: Any = root
    for part in loc:
        while typing.get_origin(tp) in (Annotated, Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        tp = typing.get_args(tp)[0] if isinstance(part, int) else tp.model_fields[part].annotation
    return tp


def _dotted(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _unwrap(error: ErrorDetails) -> ErrorDetails:
    """A nested ClassPostprocess's own error under the nesting key, else ``error`` itself."""
    inner = error.get("ctx", {}).get("error")
    if isinstance(inner, _StepError):
        return {**inner.error, "loc": (*error["loc"], *inner.error["loc"])}
    return error


def _message(error: ErrorDetails, root: type[BaseModel] = Config, quote: str = "'") -> str:
    """One pydantic error of ``root`` as "'key' must be ..., got value" (or an unknown key's
    suggestion); ``quote`` surrounds the key."""
    error = _unwrap(error)
    loc, value = error["loc"], _plain(error["input"])
    key = _dotted(loc)
    shown = f"{quote}{key}{quote}"
    if error["type"] == "extra_forbidden":
        known = list(_field_type(loc[:-1], root).model_fields)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        prefix = key[: -len(str(loc[-1]))]
        hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known: {', '.join(known)}"
        noun = "post-processing key" if root is ClassPostprocess else "key"
        return f"unknown {noun} {shown} ({hint})"
    if error["type"] == "rule":
        return f"{shown} must be {error['msg']}, got {value!r}"
    if error["type"] == "text":  # a rule across keys: its message names them
        return error["msg"]
    tp = _field_type(loc, root)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return f"section {shown} must be a mapping of key: value, got {type(value).__name__}"
    return f"{shown} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"


def one_line_error(error: ValidationError, root: type[BaseModel]) -> str:
    """The first error of a failed ``root.model_validate`` in one line (a file's reader names
    the file before it)."""
    return _message(error.errors()[0], root)


# --------------------------------------------------------------------------- public API


def _validate(d: Mapping[str, Any], source: str, overrides: Sequence[str] = ()) -> Config:
    """Config from a nested dict; the first error names ``source``, or the ``--set`` override
    that wrote the faulty key when the fault is the override's own (a type or unknown key;
    range rules are checked on the final combination, since only it must be consistent)."""
    # A section with every key commented out is YAML's null: it keeps its defaults.
    d = {k: v for k, v in d.items() if v is not None or k not in _SECTIONS}
    try:
        return Config.model_validate(d)
    except ValidationError as e:
        error = _unwrap(e.errors()[0])
        where = source
        for text in overrides:
            parts = tuple(text.partition("=")[0].strip().split("."))
            shorter = min(len(parts), len(error["loc"]))
            if error["type"] not in ("rule", "text") and parts[:shorter] == error["loc"][:shorter]:
                where = f"--set {text}"
        raise ConfigError(f"{where}: {_message(error)}") from None


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
    return _validate({**d, "name": name} if name is not None else d, source)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (name first, then the sections): what YAML and checkpoints store."""
    return cfg.model_dump()


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
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or e.__class__.__name__
        raise ConfigError(f"{path}: invalid YAML{at}: {problem}") from e
    if raw is None:  # an empty file would silently mean every default (the B7 recipe)
        raise ConfigError(
            f"{path}: the config file is empty; it needs sections such as model:, data:, "
            "train: (see configs/default.yaml)"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    merged = {"name": path.stem, **raw}
    # Validate the file alone first, so its own errors name the file and not an override.
    cfg = _validate(merged, str(path))
    if not overrides:
        return cfg
    for text in overrides:
        parts, value = _parse_override(text)
        if parts == ["name"]:
            merged["name"] = value
        else:
            section, key = parts
            if not isinstance(merged.get(section), dict):
                merged[section] = {}
            merged[section] = {**merged[section], key: value}
    return _validate(merged, f"{path} with --set {' '.join(overrides)}", overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically (temp file in the same folder, then ``os.replace``)."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    write_text_atomic(path, text)
