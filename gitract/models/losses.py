"""Training loss: BCE-with-logits plus soft Dice, both over the 3 organ channels (multi-label).

BCE gives every pixel a dense, well-conditioned gradient; Dice optimises overlap directly and
ignores the ~90% of background pixels that would otherwise dominate BCE. Their weighted sum is
the usual recipe for this competition. The Dice term is smp's ``DiceLoss(mode="multilabel")``:
per class over the whole batch, and a class with no true pixel in the batch adds 0 (its Dice is
undefined; BCE still pushes its logits down).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn

__all__ = ["DiceBCELoss", "build_loss", "dice_bce_loss"]

_DICE = DiceLoss(mode="multilabel", from_logits=True)


class _LossWeights(Protocol):
    bce_weight: float
    dice_weight: float


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.ndim not in (4, 5) or logits.shape != targets.shape:
        raise ValueError(
            "DiceBCELoss needs logits and targets of the same shape, (N, C, H, W) or "
            "(N, C, D, H, W); got logits "
            f"{tuple(logits.shape)} and targets {tuple(targets.shape)}"
        )


def dice_bce_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    bce_weight: float = 0.5,
    dice_weight: float = 0.5,
) -> torch.Tensor:
    """``bce_weight * BCEWithLogits + dice_weight * (1 - soft Dice)`` as a scalar tensor.

    Computed in float32 whatever the autocast dtype: Dice sums millions of pixels, which fp16
    cannot hold exactly, and the loss is cheap next to the network.
    """
    _check_inputs(logits, targets)
    logits = logits.float()
    targets = targets.to(dtype=logits.dtype)
    loss = logits.new_zeros(())
    if bce_weight:
        loss = loss + bce_weight * F.binary_cross_entropy_with_logits(logits, targets)
    if dice_weight:
        loss = loss + dice_weight * _DICE(logits, targets)
    return loss


class DiceBCELoss(nn.Module):
    """Thin module over :func:`dice_bce_loss`: ``loss(logits, targets)``, both (N, 3, H, W)."""

    def __init__(self, bce_weight: float = 0.5, dice_weight: float = 0.5) -> None:
        super().__init__()  # the weights' range rule lives in the config (TrainConfig)
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return dice_bce_loss(logits, targets, self.bce_weight, self.dice_weight)

    def extra_repr(self) -> str:
        return f"bce_weight={self.bce_weight}, dice_weight={self.dice_weight}"


def build_loss(train_cfg: _LossWeights) -> DiceBCELoss:
    """The loss that ``train_cfg`` (a ``TrainConfig`` or anything with the two weights) asks for."""
    return DiceBCELoss(bce_weight=train_cfg.bce_weight, dice_weight=train_cfg.dice_weight)
