"""One precision policy: the autocast dtype, the loss scaler and the memory format of a run,
decided once from the config and the device.

Training, validation, 2.5D and 3D inference and ``scripts/gpu_check.py`` all take a
:class:`Precision`; none decides on its own. On the CPU the policy runs what the config asks
(torch has CPU autocast for fp16 and bf16, and ``GradScaler("cpu")``), so the code a GPU runs is
the code the CPU tests run; a setting that cannot run is refused in one line, never ignored.
The checkpoint records what ran (:meth:`Precision.record`), and inference runs the run's own
dtype, with a one-line note where the device cannot (bf16 on a GPU without it: fp16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gitract.config import TrainConfig
from gitract.errors import ConfigError

__all__ = ["Precision"]

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_NAMES = {v: k for k, v in _DTYPES.items()}


def _bf16_ok(device: torch.device) -> bool:
    return device.type != "cuda" or torch.cuda.is_bf16_supported()


@dataclass(frozen=True)
class Precision:
    """How a run computes on ``device``: autocast ``dtype`` (None: float32), and whether
    images and the network are channels-last (a 2D layout only). ``note`` says what had to
    change from the run's own settings (printed once by the caller), else None."""

    device: torch.device
    dtype: torch.dtype | None = None
    channels_last: bool = False
    note: str | None = None

    @classmethod
    def build(
        cls, train: TrainConfig, device: torch.device, spatial_dims: int = 2, *,
        training: bool = True,
    ) -> Precision:  # fmt: skip
        """The policy of ``train`` (``amp``, ``amp_dtype``, ``channels_last``) on ``device`` for
        a network on ``spatial_dims``-D images (channels-last exists for 2D only). bf16 on a
        GPU without it: a ConfigError when ``training``, else fp16 with a note."""
        dtype = _DTYPES[train.amp_dtype] if train.amp else None
        note = None
        if dtype is torch.bfloat16 and not _bf16_ok(device):
            name = torch.cuda.get_device_name(device)
            if training:
                raise ConfigError(
                    f"train.amp_dtype: bf16 needs a GPU with bf16 support, {name} has none; "
                    "use --set train.amp_dtype=fp16"
                )
            dtype, note = torch.float16, f"{name} has no bf16: running this bf16 run in fp16"
        # torch < 2.4 has no is_autocast_available; it has autocast on cuda and cpu.
        available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cuda", "cpu"))
        if dtype is not None and not available(device.type):
            raise ConfigError(
                f"train.amp: torch {torch.__version__} has no autocast on {device.type}; "
                "use --set train.amp=false"
            )
        return cls(device, dtype, train.channels_last and spatial_dims == 2, note)

    @property
    def fp16(self) -> bool:
        return self.dtype is torch.float16

    def record(self) -> dict[str, Any]:
        """What ran, for the checkpoint's metadata: ``{"dtype": "fp16" | "bf16" | "fp32",
        "channels_last": bool}``."""
        return {"dtype": _NAMES.get(self.dtype, "fp32"), "channels_last": self.channels_last}

    def autocast(self) -> torch.autocast:
        """The forward pass's autocast context (disabled for float32)."""
        dtype = self.dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.dtype is not None)

    def scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, enabled for fp16 only (bf16 has float32's range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.fp16)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def to_model(self, model: nn.Module) -> nn.Module:
        """``model`` on the device, in the policy's memory format."""
        return model.to(self.device, memory_format=self.memory_format)

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        """A batch of images on the device, in the policy's memory format."""
        return images.to(self.device, non_blocking=True, memory_format=self.memory_format)
