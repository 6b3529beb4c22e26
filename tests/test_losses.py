"""DiceBCELoss: near zero when right, large when wrong, linear in its weights, differentiable."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gitract.config import load_config
from gitract.errors import ConfigError
from gitract.models.losses import DiceBCELoss, build_loss, dice_bce_loss

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"


def _targets(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    targets = (torch.rand(2, 3, 16, 20, generator=gen) > 0.7).float()
    targets[0, 1] = 0.0  # one empty (image, class): Dice must not blow up on it
    return targets


def test_perfect_confident_logits_give_almost_zero_loss():
    targets = _targets()
    logits = (targets * 2 - 1) * 20.0
    loss = DiceBCELoss()(logits, targets)
    assert loss.ndim == 0
    assert loss.item() < 1e-4


def test_wrong_logits_give_a_large_loss():
    targets = _targets()
    right = DiceBCELoss()((targets * 2 - 1) * 20.0, targets)
    unsure = DiceBCELoss()(torch.zeros_like(targets), targets)
    wrong = DiceBCELoss()((1 - 2 * targets) * 20.0, targets)
    assert right < unsure < wrong
    assert wrong.item() > 5.0  # BCE of confident mistakes ~ 20 on the wrong pixels


def test_weights_combine_linearly():
    targets = _targets(1)
    logits = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2))
    bce = DiceBCELoss(bce_weight=1.0, dice_weight=0.0)(logits, targets)
    dice = DiceBCELoss(bce_weight=0.0, dice_weight=1.0)(logits, targets)
    both = DiceBCELoss(bce_weight=0.3, dice_weight=1.7)(logits, targets)
    torch.testing.assert_close(both, 0.3 * bce + 1.7 * dice)
    torch.testing.assert_close(
        bce, torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    )
    assert 0.0 < dice.item() < 1.0


def test_dice_term_is_one_minus_soft_dice_per_class_over_the_batch():
    targets = torch.zeros(1, 3, 2, 2)
    targets[0, :, 0, 0] = 1.0
    probs = torch.full_like(targets, 0.5)
    logits = torch.logit(probs)
    # Per class: intersection 0.5, sum of probs 2, sum of targets 1 -> Dice 1/3.
    loss = dice_bce_loss(logits, targets, bce_weight=0.0, dice_weight=1.0)
    torch.testing.assert_close(loss, torch.tensor(2.0 / 3.0))


def test_gradients_flow_to_the_logits():
    targets = _targets()
    logits = torch.randn(targets.shape, requires_grad=True)
    DiceBCELoss()(logits, targets).backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_half_precision_logits_give_a_float32_loss():
    targets = _targets()
    loss = DiceBCELoss()(((targets * 2 - 1) * 3).half(), targets)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize(
    ("logits_shape", "targets_shape"),
    [((2, 3, 8, 8), (2, 3, 8, 9)), ((2, 3, 8, 8), (2, 8, 8)), ((3, 8, 8), (3, 8, 8))],
)
def test_bad_shapes_raise_naming_both(logits_shape, targets_shape):
    with pytest.raises(ValueError) as err:
        DiceBCELoss()(torch.zeros(logits_shape), torch.zeros(targets_shape))
    assert str(logits_shape) in str(err.value)
    assert str(targets_shape) in str(err.value)


def test_build_loss_reads_the_weights_from_the_train_config():
    loss = build_loss(SimpleNamespace(bce_weight=0.25, dice_weight=0.75))
    assert isinstance(loss, DiceBCELoss)
    assert (loss.bce_weight, loss.dice_weight) == (0.25, 0.75)
    assert "bce_weight=0.25" in repr(loss)


@pytest.mark.parametrize(
    ("bce", "dice", "message"),
    [
        (-0.1, 1.0, "'train.bce_weight' must be >= 0, got -0.1"),
        (1.0, -1.0, "'train.dice_weight' must be >= 0, got -1.0"),
        (0.0, 0.0, "'train.dice_weight' must be > 0 when train.bce_weight is 0, got 0.0"),
    ],
)
def test_bad_weights_raise_config_error_naming_them(bce, dice, message):
    # The range rule lives once, in the config: a loss is only built from a checked config.
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [f"train.bce_weight={bce}", f"train.dice_weight={dice}"])
    assert message in str(err.value)
