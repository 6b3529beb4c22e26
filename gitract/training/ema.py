"""An exponential moving average of a model's weights, updated with one fused op per step.

timm's ``ModelEmaV3`` rebuilds two ``state_dict()``s of the network at every update (1,254
entries for the B7 U-Net, ~8 ms each on a 2-core CPU). Here the tensors to average are listed
once, when the EMA is built: parameters and floating-point buffers are averaged with one
``torch._foreach_lerp_``, integer buffers (BatchNorm's batch counters) are copied. The numbers
are those of ``ModelEmaV3(use_warmup=True)`` with its default warm-up (``1 - (1 + t)^(-2/3)``,
capped at ``decay``), so the saved weights do not change.

Build it after the model is on its device (``.to()`` replaces buffer tensors, which the lists
would then miss); loading a state dict into either model later is fine (it copies in place).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModelEma"]

WARMUP_POWER = 2 / 3


class ModelEma:
    """``module``: the averaged copy of the model (validated and saved in its place)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        pairs = list(zip(_tensors(self.module), _tensors(model), strict=True))
        self._ema_floats = [e for e, _ in pairs if e.is_floating_point()]
        self._model_floats = [m for e, m in pairs if e.is_floating_point()]
        self._counters = [(e, m) for e, m in pairs if not e.is_floating_point()]
        n_params = len(list(model.parameters()))  # _tensors lists the parameters first
        self._float_buffers = [(e, m) for e, m in pairs[n_params:] if e.is_floating_point()]
        self._n_float_params = len(self._ema_floats) - len(self._float_buffers)

    def decay_at(self, step: int) -> float:
        """The decay after ``step`` optimizer steps: 0 at the first (the EMA starts as the
        model), then the warm-up ``1 - (1 + t)^(-2/3)`` until it reaches ``decay``."""
        t = step - 1
        if t <= 0:
            return 0.0
        return min(1 - (1 + t) ** -WARMUP_POWER, self.decay)

    @torch.no_grad()
    def update(self, step: int, skipped: torch.Tensor | None = None) -> None:
        """Move the average towards the model's current weights (``step``: optimizer steps
        taken so far, the one just taken included). ``skipped``: the device's 0/1 flag of a
        step skipped as non-finite, whose forward may have left non-finite BatchNorm
        statistics: the average then stays as it was, with no host sync to find out."""
        weight = 1.0 - self.decay_at(step)
        if skipped is None:
            if self._ema_floats:
                torch._foreach_lerp_(self._ema_floats, self._model_floats, weight)
            for ema_value, model_value in self._counters:
                ema_value.copy_(model_value)
            return
        # Skipped: the parameters did not move (weight 0 keeps the average), but the float
        # buffers may hold NaN, and lerp(a, NaN, 0) is NaN: those are selected, not lerped.
        kept = 1.0 - skipped.to(torch.float32)
        n = self._n_float_params
        if n:
            weights = [kept * weight] * n  # one 0-d tensor, shared
            torch._foreach_lerp_(self._ema_floats[:n], self._model_floats[:n], weights)
        for ema_value, model_value in self._float_buffers:
            moved = torch.lerp(ema_value, model_value, weight)
            ema_value.copy_(torch.where(kept > 0, moved, ema_value))
        for ema_value, model_value in self._counters:
            ema_value.copy_(torch.where(kept > 0, model_value, ema_value))


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer, in a fixed order (the same for a model and its deep copy)."""
    return [p.detach() for p in model.parameters()] + list(model.buffers())
