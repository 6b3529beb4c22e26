"""Build the segmentation network from the config, and rebuild it from a checkpoint.

``build_model`` is a thin layer over ``segmentation_models_pytorch.create_model`` (any smp
architecture, any smp or ``tu-`` timm encoder) that adds what a Kaggle kernel needs: weights from
a local file (kernels have no internet), and a one-line ConfigError instead of a 25-second retry
loop followed by a deep traceback when named weights cannot be downloaded.

Checkpoints are plain dicts (``{"model": state_dict, "config": config_to_dict(cfg), ...}``) that
load with ``torch.load(..., weights_only=True)``: no pickled code is ever executed, and the
config inside is enough to rebuild the network (the nanoGPT way).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import pickle
import re
import socket
import threading
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import segmentation_models_pytorch as smp
import torch
from torch import nn

from gitract.config import Config, ModelConfig, config_from_dict
from gitract.errors import CheckpointError, ConfigError

__all__ = ["build_model", "load_checkpoint", "load_model_from_checkpoint", "WEIGHT_SUFFIXES"]

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
        import timm

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


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint (where smp and timm weights live) answers a TCP connect.

    Run in a thread so that a hanging DNS lookup (getaddrinfo ignores socket timeouts) costs at
    most ``timeout`` seconds.
    """
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or 443
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(ok)


@contextlib.contextmanager
def _offline_if_unreachable() -> Iterator[None]:
    """Put huggingface_hub in offline mode while the hub cannot be reached.

    Without internet, ``hf_hub_download`` retries with back-off for ~25 s before it fails; in
    offline mode it serves weights already in the local cache and fails at once otherwise. Skipped
    behind a proxy, where a direct TCP probe says nothing about reachability.
    """
    from huggingface_hub import constants

    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY"))
    if constants.HF_HUB_OFFLINE or proxied or _hub_reachable():
        yield
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


def _download_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the weights could not be fetched': URLError and all
    huggingface_hub errors (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError) are
    OSErrors; torch.hub and timm raise RuntimeError on a failed or corrupt download."""
    return (OSError, RuntimeError)


# --------------------------------------------------------------------------- local weights


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


def _read_state_dict(path: Path, what: str, error: type[Exception]) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a ``torch.save``'d state dict (weights_only)."""
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file

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


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the key prefix that torch.compile ('_orig_mod.') or DataParallel ('module.') adds."""
    state = dict(state)
    for prefix in ("_orig_mod.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _mismatch(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
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
    state = _adapt_first_conv(
        model.encoder, _strip_prefix(_read_state_dict(path, what, ConfigError))
    )
    problem = _mismatch(model.encoder, state)
    if problem:
        raise ConfigError(f"{what} {path}: does not fit encoder '{encoder_name}': {problem}")
    model.encoder.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------- public API


def build_model(model_cfg: ModelConfig, in_channels: int, classes: int = 3) -> nn.Module:
    """The smp network of ``model_cfg`` with ``in_channels`` inputs (2.5D slices) and
    ``classes`` logit maps (one per organ, multi-label).

    ``model_cfg.encoder_weights`` may be None (random init), a weights name smp knows for the
    encoder ('imagenet', 'advprop', ...; for ``tu-`` encoders only 'imagenet', meaning timm's
    pretrained weights of the tag in the encoder name), or a local state dict file of the
    encoder (.pth/.pt/.bin/.safetensors), e.g. a saved ``model.encoder.state_dict()`` or
    smp-hub's ``model.safetensors``. Named weights that cannot be downloaded -> ConfigError.
    """
    if in_channels < 1 or classes < 1:
        raise ConfigError(
            f"model: in_channels and classes must be >= 1, got {in_channels}, {classes}"
        )
    arch, encoder, weights = model_cfg.arch, model_cfg.encoder_name, model_cfg.encoder_weights
    _check_arch(arch)
    _check_encoder(encoder)

    def create(w: Any) -> nn.Module:
        with warnings.catch_warnings():
            # smp 0.6 warns that 'timm-' names are deprecated: the name is the user's choice.
            warnings.simplefilter("ignore", DeprecationWarning)
            return smp.create_model(arch, encoder, w, in_channels=in_channels, classes=classes)

    if weights is None:
        return create(None)
    if _is_weights_file(weights):
        model = create(None)
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
    if encoder.startswith("tu-"):
        import timm

        if not timm.models.is_model_pretrained(encoder[3:]):
            # timm would only log a warning and silently train from random init.
            raise ConfigError(
                f"model.encoder_weights: timm has no pretrained weights for '{encoder[3:]}' "
                f"(use a name with weights, e.g. tu-tf_efficientnet_b7, or null)"
            )
    w: Any = True if timm_universal else weights
    try:
        with _offline_if_unreachable():
            return create(w)
    except _download_errors() as e:
        raise ConfigError(
            f"model.encoder_weights: cannot fetch '{weights}' weights for encoder '{encoder}' "
            f"(no internet? {type(e).__name__}); {_OFFLINE_HINT}"
        ) from e


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


def load_model_from_checkpoint(
    ckpt: Mapping[str, Any], source: str | Path = "checkpoint"
) -> tuple[nn.Module, Config]:
    """Rebuild the network from ``ckpt["config"]`` and load ``ckpt["model"]`` strictly.

    The encoder is built with ``encoder_weights=None`` (the checkpoint has all the weights, and
    nothing is downloaded). The input channels are ``data.n_slices``; the output classes are
    ``len(ckpt["classes"])`` when present, else 3. Returns the model in eval mode and the config.
    ``source`` (usually the file's path) is what error messages name.
    """
    where = f"checkpoint {source}" if source != "checkpoint" else "checkpoint"
    for key in ("config", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{where}: no '{key}' entry (keys: {', '.join(map(str, ckpt))})")
    try:
        cfg = config_from_dict(ckpt["config"], source=f"{where} config")
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    state = ckpt["model"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{where}: 'model' is not a state dict")
    classes = len(ckpt["classes"]) if isinstance(ckpt.get("classes"), (list, tuple)) else 3
    model_cfg = dataclasses.replace(cfg.model, encoder_weights=None)
    try:
        model = build_model(model_cfg, in_channels=cfg.data.n_slices, classes=classes)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e
    state = _strip_prefix(state)
    problem = _mismatch(model, state)
    if problem:
        raise CheckpointError(
            f"{where}: weights do not match its config "
            f"({cfg.model.arch}/{cfg.model.encoder_name}): {problem}"
        )
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, cfg
