"""The 3D network (``model.kind: 3d``): a MONAI SegResNet, or optionally a MONAI UNet.

Why SegResNet by default: it is what the competition's 1st place used for its 3D models
(MONAI SegResNets on whole case-day volumes, blended with 2.5D models); its GroupNorm does not
depend on the batch size, which matters when a GPU holds only 2-4 patches of 80 x 160 x 160; and
its asymmetric design (1, 2, 2, 4 residual blocks down, 1 per level up) puts the capacity in the
encoder at a moderate activation cost. MONAI's UNet (InstanceNorm, residual units, 4 stride-2
levels) is offered for comparison. Both take (N, 1, D, H, W) and return (N, classes, D, H, W)
logits; the sizes of D, H and W must be multiples of 2 ** levels (``gitract.config.LEVELS_3D``:
each level halves them; the config checks the patch size).
"""

from __future__ import annotations

import difflib

from torch import nn

from gitract.config import LEVELS_3D, ModelConfig
from gitract.errors import ConfigError

__all__ = ["ARCHS_3D", "build_model3d"]

#: The MONAI networks ``model.arch`` may name for ``model.kind: 3d`` (matched case-insensitively).
ARCHS_3D = ("SegResNet", "UNet")
#: ``model.norm`` and ``model.act`` as MONAI layer specs. BatchNorm and PReLU are the 1st place's
#: SegResNets' (batches of 4 patches); GroupNorm does not depend on the batch size.
_NORMS: dict[str, str | tuple] = {
    "group": ("GROUP", {"num_groups": 8}),
    "batch": "BATCH",
    "instance": "INSTANCE",
}
_ACTS: dict[str, str | tuple] = {"relu": ("RELU", {"inplace": True}), "prelu": "PRELU"}


def _arch_key(arch: str) -> str:
    key = arch.lower()
    if key in LEVELS_3D:
        return key
    close = difflib.get_close_matches(key, list(LEVELS_3D), n=1)
    hint = ""
    if close:
        hint = f"did you mean '{ARCHS_3D[list(LEVELS_3D).index(close[0])]}'? "
    raise ConfigError(
        f"model.arch: unknown 3D architecture '{arch}' ({hint}model.kind 3d takes: "
        f"{', '.join(ARCHS_3D)})"
    )


def build_model3d(model_cfg: ModelConfig, classes: int = 3) -> nn.Module:
    """MONAI network for (N, 1, D, H, W) float input -> (N, classes, D, H, W) logits.

    ``model_cfg.arch`` names the network (SegResNet or UNet), ``model_cfg.init_filters`` the
    channels of its first level (doubled at each level down; the config checks that they are
    a multiple of 8 under GroupNorm of 8 groups), ``model_cfg.norm`` and ``model_cfg.act`` its
    layers (null: the network's own, GroupNorm + ReLU for SegResNet, InstanceNorm + PReLU for
    UNet, as before these options).
    """
    try:  # MONAI imports slowly (and is an extra): only when a 3D model is built
        from monai.networks.nets import SegResNet, UNet
    except ImportError:
        raise ConfigError(
            "model.kind: 3d needs MONAI, which is not installed: pip install 'gitract[3d]'"
        ) from None

    key = _arch_key(model_cfg.arch)
    filters = model_cfg.init_filters
    norm = _NORMS[model_cfg.norm_3d()]
    if key == "segresnet":
        return SegResNet(
            spatial_dims=3,
            init_filters=filters,
            in_channels=1,
            out_channels=classes,
            blocks_down=(1, 2, 2, 4),
            blocks_up=(1, 1, 1),
            norm=norm,
            act=_ACTS[model_cfg.act or "relu"],
        )
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=classes,
        channels=tuple(filters * 2**k for k in range(5)),
        strides=(2, 2, 2, 2),
        num_res_units=2,
        norm=norm,
        act=_ACTS[model_cfg.act or "prelu"],
    )
