"""Build the 2.5D segmentation network from the config.

``build_model`` is a thin layer over ``segmentation_models_pytorch.create_model`` (any smp
architecture, any smp or ``tu-`` timm encoder) that adds what a Kaggle kernel needs: weights from
a local file (kernels have no internet), and a one-line ConfigError instead of a 25-second retry
loop followed by a deep traceback when named weights cannot be downloaded.
"""

from __future__ import annotations

import difflib
import os
import pickle
import socket
import urllib.error
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import huggingface_hub
import segmentation_models_pytorch as smp
import timm
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file
from torch import nn

from gitract.config import ModelConfig
from gitract.errors import ConfigError
from gitract.models.checkpoint import _first_line, _torch_load, state_mismatch, strip_prefix

__all__ = [
    "DroppedModule",
    "WEIGHT_SUFFIXES",
    "build_model",
    "drop_unused_modules",
    "without_dropped",
]

#: File suffixes taken as a local weights file in ``model.encoder_weights``.
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
_OFFLINE_HINT = (
    "put the encoder's state dict on disk and use "
    "--set model.encoder_weights=/path/to/encoder.pth, or --set model.encoder_weights=null "
    "for random init"
)


# --------------------------------------------------------------------------- names


def _check_arch(arch: str) -> None:
    """ConfigError naming an architecture smp does not have (smp matches it case-insensitively)."""
    known = {k: cls.__name__ for k, cls in smp.MODEL_ARCHITECTURES_MAPPING.items()}
    if arch.lower() in known:
        return
    close = difflib.get_close_matches(arch.lower(), list(known), n=1)
    hint = f"did you mean '{known[close[0]]}'? " if close else ""
    raise ConfigError(
        f"model.arch: unknown architecture '{arch}' ({hint}smp has: {', '.join(known.values())})"
    )


def _check_encoder(name: str) -> None:
    """ConfigError naming an encoder that neither smp nor timm (``tu-<timm name>``) knows."""
    if name.startswith("tu-"):
        if timm.is_model(name[3:]):
            return
        close = difflib.get_close_matches(name[3:], timm.list_models(), n=1)
        hint = f" (did you mean 'tu-{close[0]}'?)" if close else ""
        raise ConfigError(f"model.encoder_name: timm has no model '{name[3:]}'{hint}")
    names = smp.encoders.get_encoder_names()
    if name in names or smp.encoders.is_equivalent_to_timm_universal(name):
        return
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(
        f"model.encoder_name: unknown encoder '{name}' ({hint}or 'tu-<timm model name>')"
    )


def _is_weights_file(weights: str) -> bool:
    """A local file rather than a weights name such as 'imagenet' or 'advprop'."""
    return (
        weights.lower().endswith(WEIGHT_SUFFIXES)
        or "/" in weights
        or os.sep in weights
        or Path(weights).is_file()
    )


# --------------------------------------------------------------------------- downloads


#: Errors that say "no connection" rather than, say, a 404 or an unwritable cache.
_NETWORK_ERRORS = (
    ConnectionError,
    TimeoutError,
    socket.gaierror,
    urllib.error.URLError,
    LocalEntryNotFoundError,  # huggingface_hub: not on the hub and not in the cache
)

#: Messages of the errors torch.load and torch.hub raise on a truncated, corrupt or tampered
#: file (the types alone, RuntimeError mostly, say nothing).
_CORRUPT_MARKERS = (
    "PytorchStreamReader",
    "zip archive",
    "central directory",
    "invalid hash",
    "invalid load key",
    "Ran out of input",
    "Weights only load failed",
    "deserializing header",
    "HeaderTooLarge",
    "MetadataIncompleteBuffer",
    "InvalidHeader",
)


def _cached_weights_file(encoder: str, weights: str) -> str | None:
    """Where the Hugging Face cache holds the named weights of ``encoder``, if it holds them
    (to name the file a corrupt download left behind); None when not found."""
    candidates: list[tuple[str, str | None, str]] = []
    try:
        if encoder.startswith("tu-"):
            cfg = timm.models.get_pretrained_cfg(encoder[3:])
            if cfg is not None and cfg.hf_hub_id:
                repo = cfg.hf_hub_id
                candidates = [(repo, None, "model.safetensors"), (repo, None, "pytorch_model.bin")]
        elif encoder in smp.encoders.encoders:
            settings = smp.encoders.encoders[encoder]["pretrained_settings"].get(weights, {})
            if "repo_id" in settings:
                repo, revision = settings["repo_id"], settings.get("revision")
                candidates = [(repo, revision, "model.safetensors")]
        for repo, revision, filename in candidates:
            found = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision)
            if isinstance(found, str):
                return found
    except Exception:  # best effort: the message is still right without the path
        return None
    return None


def _weights_error(e: BaseException, encoder: str, weights: str) -> ConfigError | None:
    """The one-line ConfigError that says what went wrong with named weights: a failed download
    (any OSError: huggingface_hub, urllib, an unwritable cache), weights that do not fit the
    encoder, or a corrupt cached file; None for anything else (a bug: it keeps its traceback).
    Without internet huggingface_hub retries for ~25 s first (HF_HUB_OFFLINE=1 fails at once)."""
    what = f"model.encoder_weights: '{weights}' weights for encoder '{encoder}'"
    cause = f"{type(e).__name__}: {_first_line(e)}"
    text = str(e)
    if isinstance(e, OSError):
        hint = "no internet? " if isinstance(e, _NETWORK_ERRORS) else ""
        return ConfigError(
            f"model.encoder_weights: cannot fetch '{weights}' weights for encoder '{encoder}' "
            f"({hint}{cause}); {_OFFLINE_HINT}"
        )
    if isinstance(e, RuntimeError) and "Error(s) in loading state_dict" in text:
        return ConfigError(f"{what} do not fit the encoder ({cause})")
    corrupt = type(e).__name__ == "SafetensorError" or isinstance(
        e, (pickle.UnpicklingError, EOFError)
    )
    if corrupt or any(marker in text for marker in _CORRUPT_MARKERS):
        path = _cached_weights_file(encoder, weights)
        where = f"the cached file {path}" if path else "the cached weights file"
        return ConfigError(
            f"{what}: {where} is corrupt or truncated ({cause}); delete it to download it again"
        )
    return None


# --------------------------------------------------------------------------- local weights


def _read_state_dict(path: Path, what: str, error: type[Exception]) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a ``torch.save``'d state dict (weights_only)."""
    if path.suffix == ".safetensors" and path.is_file():
        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:
            raise error(f"{what} {path}: not a readable safetensors file ({_first_line(e)})") from e
    else:
        state = _torch_load(path, what, error)
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise error(f"{what} {path}: expected a state dict of name -> tensor")
    return dict(state)


def _adapt_first_conv(
    encoder: nn.Module, state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Fit 3-channel (RGB) stem weights to an encoder built for another number of channels.

    Same rule as smp's own pretrained loading (``patch_first_conv``): 1 channel sums the RGB
    filters; more channels cycle R, G, B and rescale by 3 / in_channels so activations keep
    their scale. Only a single 4D weight whose shapes differ in the input dimension is touched.
    """
    own = encoder.state_dict()
    diff = [k for k in own if k in state and own[k].shape != state[k].shape]
    if len(diff) != 1:
        return state
    key = diff[0]
    w, target = state[key], own[key].shape
    if w.ndim != 4 or w.shape[1] != 3 or w.shape[0] != target[0] or w.shape[2:] != target[2:]:
        return state
    n = target[1]
    new = w.sum(1, keepdim=True) if n == 1 else w[:, [i % 3 for i in range(n)]] * (3 / n)
    return {**state, key: new}


def _load_encoder_file(model: nn.Module, path: Path, encoder_name: str) -> None:
    """Load a local encoder state dict into ``model.encoder`` strictly (ConfigError naming it)."""
    what = "model.encoder_weights"
    state = without_dropped(model.encoder, strip_prefix(_read_state_dict(path, what, ConfigError)))
    state = _adapt_first_conv(model.encoder, state)
    problem = state_mismatch(model.encoder, state)
    if problem:
        raise ConfigError(f"{what} {path}: does not fit encoder '{encoder_name}': {problem}")
    model.encoder.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- unused modules


class DroppedModule(nn.Module):
    """Stands where :func:`drop_unused_modules` removed a module the encoder never calls.

    It has no parameters, so DistributedDataParallel (which, without the costly unused-parameter
    search, fails at the second step on a parameter that never gets a gradient) and the
    optimizer only see what the network uses; calling it is a bug and raises.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"gitract dropped the encoder's unused module '{self.name}'")

    def extra_repr(self) -> str:
        return self.name


def _called_modules(encoder: nn.Module, x: torch.Tensor) -> set[int] | None:
    """ids of the modules a forward of ``encoder`` calls, in train mode and in eval mode
    (None if the forward fails on the probe). Leaves no trace: the batch-norm statistics,
    the random number generator and the train/eval mode are as before."""
    called: set[int] = set()
    hooks = [m.register_forward_hook(lambda m, i, o: called.add(id(m))) for m in encoder.modules()]
    buffers = {name: b.clone() for name, b in encoder.named_buffers()}
    training = encoder.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for mode in (True, False):
                encoder.train(mode)
                encoder(x)
    except Exception:
        return None
    finally:
        for hook in hooks:
            hook.remove()
        encoder.train(training)
        with torch.no_grad():
            for name, b in encoder.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    return called


def drop_unused_modules(encoder: nn.Module, in_channels: int) -> list[str]:
    """Replace the encoder's modules with weights that its forward never calls (classifier-head
    leftovers such as smp EfficientNet's ``_conv_head``/``_bn1``, 1.6M parameters in B7, or
    timm-efficientnet's ``conv_head``/``bn2``) by a :class:`DroppedModule`; return their names.

    Found by running the encoder once in train and once in eval mode on a small probe batch
    and seeing which modules it calls. If the probe fails (an encoder that wants another input
    size) or the encoder no longer runs without those modules (one that reaches into a module
    without calling it), nothing is dropped.
    """
    for side in (64, 224):
        x = torch.zeros(2, in_channels, side, side)
        called = _called_modules(encoder, x)
        if called is not None:
            break
    else:
        return []
    drops: list[tuple[nn.Module, str, str, nn.Module]] = []
    inside_dropped: list[str] = []
    for name, module in encoder.named_modules():
        if not name or any(name.startswith(d + ".") for d in inside_dropped):
            continue
        subtree = list(module.modules())
        if any(id(m) in called for m in subtree):
            continue
        if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = encoder.get_submodule(parent_name)
        drops.append((parent, child, name, module))
        inside_dropped.append(name)
    if not drops:
        return []
    for parent, child, name, _ in drops:
        setattr(parent, child, DroppedModule(name))
    if _called_modules(encoder, x) is None:  # it did need them after all: put them back
        for parent, child, _, module in drops:
            setattr(parent, child, module)
        return []
    return [name for _, _, name, _ in drops]


def without_dropped(module: nn.Module, state: Mapping[str, torch.Tensor]) -> dict:
    """``state`` less the keys of ``module``'s dropped modules (older checkpoints and smp-hub
    encoder files still hold their weights)."""
    prefixes = tuple(
        f"{name}." for name, m in module.named_modules() if isinstance(m, DroppedModule)
    )
    return {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}


# --------------------------------------------------------------------------- public API


def build_model(model_cfg: ModelConfig, in_channels: int, classes: int = 3) -> nn.Module:
    """The smp network of ``model_cfg`` with ``in_channels`` inputs (2.5D slices) and
    ``classes`` logit maps (one per organ, multi-label); with ``model_cfg.aux_head`` it returns
    ``(masks, presence)``, presence being (N, classes) logits of "organ on this slice".

    ``model_cfg.encoder_weights`` may be None (random init), a weights name smp knows for the
    encoder ('imagenet', 'advprop', ...; for ``tu-`` encoders only 'imagenet', meaning timm's
    pretrained weights of the tag in the encoder name), or a local state dict file of the
    encoder (.pth/.pt/.bin/.safetensors), e.g. a saved ``model.encoder.state_dict()`` or
    smp-hub's ``model.safetensors``. Named weights that cannot be downloaded, that are corrupt
    in the cache or that do not fit the encoder -> a ConfigError that says which.

    Encoder modules that the forward never calls are replaced by :class:`DroppedModule`
    (:func:`drop_unused_modules`): DistributedDataParallel needs every parameter to get a
    gradient.
    """
    arch, encoder, weights = model_cfg.arch, model_cfg.encoder_name, model_cfg.encoder_weights
    _check_arch(arch)
    _check_encoder(encoder)

    # The classification head: per-slice "organ present" logits from the deepest features,
    # for the post-processing's slice gate; the model then returns (masks, presence).
    aux = {"classes": classes, "dropout": 0.2} if model_cfg.aux_head else None

    def create(w: Any) -> nn.Module:
        with warnings.catch_warnings():
            # smp 0.6 warns that 'timm-' names are deprecated: the name is the user's choice.
            warnings.simplefilter("ignore", DeprecationWarning)
            return smp.create_model(
                arch, encoder, w, in_channels=in_channels, classes=classes, aux_params=aux
            )

    if weights is None or _is_weights_file(weights):
        model = create(None)
        drop_unused_modules(model.encoder, in_channels)
        if weights is not None:
            _load_encoder_file(model, Path(weights).expanduser(), encoder)
        return model

    # 'tu-' (and the old 'timm-' names smp now maps to 'tu-') take pretrained=True: timm picks
    # the weights by the tag in the name (tu-tf_efficientnet_b7.ns_jft_in1k).
    timm_universal = encoder.startswith("tu-") or smp.encoders.is_equivalent_to_timm_universal(
        encoder
    )
    if timm_universal:
        available = ["imagenet"]
    else:
        available = list(smp.encoders.encoders[encoder]["pretrained_settings"])
    if weights not in available:
        raise ConfigError(
            f"model.encoder_weights: unknown weights '{weights}' for encoder '{encoder}' "
            f"(smp has: {', '.join(available) or 'none'}; or a local file, or null)"
        )
    if encoder.startswith("tu-") and not timm.models.is_model_pretrained(encoder[3:]):
        # timm would only log a warning and silently train from random init.
        raise ConfigError(
            f"model.encoder_weights: timm has no pretrained weights for '{encoder[3:]}' "
            f"(use a name with weights, e.g. tu-tf_efficientnet_b7, or null)"
        )
    w: Any = True if timm_universal else weights
    try:
        model = create(w)
    except Exception as e:
        error = _weights_error(e, encoder, weights)
        if error is None:
            raise
        raise error from e
    drop_unused_modules(model.encoder, in_channels)
    return model
