"""The 3D network (``model.kind: 3d``): a MONAI SegResNet, or optionally a MONAI UNet.

Why SegResNet by default: it is what the competition's 1st place used for its 3D models
(MONAI SegResNets on whole case-day volumes, blended with 2.5D models); its GroupNorm does not
depend on the batch size, which matters when a GPU holds only 2-4 patches of 80 x 160 x 160; and
its asymmetric design (1, 2, 2, 4 residual blocks down, 1 per level up) puts the capacity in the
encoder at a moderate activation cost. MONAI's UNet (InstanceNorm, residual units, 4 stride-2
levels) is offered for comparison. Both take (N, 1, D, H, W) and return (N, classes, D, H, W)
logits; the sizes of D, H and W must be multiples of :func:`size_multiple` (each level halves
them).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from torch import nn

from gitract.config import ModelConfig
from gitract.errors import ConfigError

__all__ = ["ARCHS_3D", "build_model3d", "check_patch_size", "size_multiple"]

#: The MONAI networks ``model.arch`` may name for ``model.kind: 3d`` (matched case-insensitively).
ARCHS_3D = ("SegResNet", "UNet")
_DEPTH = {"segresnet": 3, "unet": 4}  # stride-2 levels


def _arch_key(arch: str) -> str:
    key = arch.lower()
    if key in _DEPTH:
        return key
    close = difflib.get_close_matches(key, list(_DEPTH), n=1)
    hint = ""
    if close:
        hint = f"did you mean '{ARCHS_3D[list(_DEPTH).index(close[0])]}'? "
    raise ConfigError(
        f"model.arch: unknown 3D architecture '{arch}' ({hint}model.kind 3d takes: "
        f"{', '.join(ARCHS_3D)})"
    )


def size_multiple(arch: str) -> int:
    """What every patch and window side must be a multiple of for ``arch`` (2 ** levels)."""
    return 2 ** _DEPTH[_arch_key(arch)]


def check_patch_size(model_cfg: ModelConfig, patch_size: Sequence[int]) -> None:
    """ConfigError naming ``data.patch_size`` unless it is (D, H, W), each a positive multiple of
    the network's downsampling factor (otherwise skip connections would not line up)."""
    multiple = size_multiple(model_cfg.arch)
    if len(patch_size) != 3 or any(s <= 0 or s % multiple for s in patch_size):
        raise ConfigError(
            f"data.patch_size: must be [D, H, W], three positive multiples of {multiple} for "
            f"model.arch {model_cfg.arch}, got {list(patch_size)}"
        )


def build_model3d(model_cfg: ModelConfig, classes: int = 3) -> nn.Module:
    """MONAI network for (N, 1, D, H, W) float input -> (N, classes, D, H, W) logits.

    ``model_cfg.arch`` names the network (SegResNet or UNet), ``model_cfg.init_filters`` the
    channels of its first level (doubled at each level down). SegResNet's GroupNorm uses 8
    groups, so its ``init_filters`` must be a multiple of 8.
    """
    try:  # MONAI imports slowly (and is an extra): only when a 3D model is built
        from monai.networks.nets import SegResNet, UNet
    except ImportError:
        raise ConfigError(
            "model.kind: 3d needs MONAI, which is not installed: pip install 'gitract[3d]'"
        ) from None

    key = _arch_key(model_cfg.arch)
    filters = model_cfg.init_filters
    if key == "segresnet":
        if filters < 8 or filters % 8:
            raise ConfigError(
                f"model.init_filters: SegResNet needs a multiple of 8 (GroupNorm of 8 groups), "
                f"got {filters}"
            )
        return SegResNet(
            spatial_dims=3,
            init_filters=filters,
            in_channels=1,
            out_channels=classes,
            blocks_down=(1, 2, 2, 4),
            blocks_up=(1, 1, 1),
            norm=("GROUP", {"num_groups": 8}),
        )
    if filters < 1:
        raise ConfigError(f"model.init_filters: must be >= 1, got {filters}")
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=classes,
        channels=tuple(filters * 2**k for k in range(5)),
        strides=(2, 2, 2, 2),
        num_res_units=2,
        norm="INSTANCE",
    )
