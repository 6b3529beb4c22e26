"""Whole-volume prediction of 3D models: sliding windows, flip TTA, back to the native slice size.

A case-day on the grid (:func:`gitract.data.patches.load_volume`) is covered by windows of the
training patch size (``monai.inferers.sliding_window_inference``, Gaussian-weighted blending of
the overlaps, so window borders, where the network saw the least context, count least). The
flip views go through as one batch per model, each flipped back before averaging, and the mean
probability is resized per slice from the grid to the slice's own H x W (bilinear: the
submission thresholds probabilities, not labels, so nothing is lost to nearest-neighbour steps).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gitract.config import DataConfig, InferConfig
from gitract.errors import ConfigError

__all__ = ["FLIP_DIMS_3D", "predict_volume3d"]

#: Flip TTA views on a (N, C, D, H, W) tensor: hflip flips W (left-right), vflip flips H.
FLIP_DIMS_3D: dict[str, tuple[int, ...]] = {"hflip": (-1,), "vflip": (-2,)}


def _views(tta_flips: Sequence[str]) -> list[tuple[int, ...]]:
    unknown = [name for name in tta_flips if name not in FLIP_DIMS_3D]
    if unknown:
        raise ConfigError(
            f"infer.tta_flips: unknown flip {unknown[0]!r}; expected some of {list(FLIP_DIMS_3D)}"
        )
    return [()] + [FLIP_DIMS_3D[name] for name in tta_flips]


@torch.inference_mode()
def predict_volume3d(
    models: Sequence[nn.Module],
    image: np.ndarray,
    native_hw: tuple[int, int],
    data_cfg: DataConfig,
    infer_cfg: InferConfig,
    device: torch.device,
    amp: bool = False,
) -> np.ndarray:
    """(D, gH, gW) normalised image -> float32 (D, 3, H, W) probabilities at ``native_hw``.

    The mean of the sigmoid over ``models`` (used as they are: put them in eval mode first) and
    over the identity plus the views of ``infer_cfg.tta_flips``, each flipped back. Windows are
    ``data_cfg.patch_size`` (a volume smaller than a window is padded for the network and
    cropped back), overlapping by ``infer_cfg.sw_overlap``, ``infer_cfg.sw_batch_size`` per
    forward pass. ``amp`` runs the networks in float16 autocast on CUDA (ignored elsewhere).
    """
    from monai.inferers import sliding_window_inference  # MONAI imports slowly

    if not models:
        raise ValueError("predict_volume3d needs at least one model")
    if image.ndim != 3:
        raise ValueError(f"predict_volume3d needs a (D, H, W) image, got shape {image.shape}")
    views = _views(infer_cfg.tta_flips)
    volume = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    volume = volume.to(device)[None, None]
    batch = torch.cat([volume.flip(dims) if dims else volume for dims in views])
    use_amp = amp and device.type == "cuda"
    total: torch.Tensor | None = None
    for model in models:

        def predictor(x: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                return model(x).float()

        logits = sliding_window_inference(
            batch,
            roi_size=[int(s) for s in data_cfg.patch_size],
            sw_batch_size=infer_cfg.sw_batch_size,
            predictor=predictor,
            overlap=infer_cfg.sw_overlap,
            mode="gaussian",
        )
        if hasattr(logits, "as_tensor"):  # a MONAI MetaTensor: keep the plain tensor
            logits = logits.as_tensor()
        probs = torch.sigmoid(logits.float())
        for dims, view in zip(views, probs, strict=True):
            view = view.flip(dims) if dims else view
            total = view if total is None else total + view
    assert total is not None
    mean = total / (len(models) * len(views))  # (3, D, gH, gW)
    slices = mean.permute(1, 0, 2, 3)  # (D, 3, gH, gW): each slice resized on its own
    if tuple(slices.shape[-2:]) != tuple(native_hw):
        size = (int(native_hw[0]), int(native_hw[1]))
        slices = F.interpolate(slices, size=size, mode="bilinear", align_corners=False)
    return slices.clamp_(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False)
