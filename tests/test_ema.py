"""The weights' moving average: the numbers of timm's ModelEmaV3 without its per-step
state-dict rebuilds."""

from __future__ import annotations

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn

from gitract.training.ema import ModelEma


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1))


def test_ema_matches_timm_model_ema_v3_bit_for_bit() -> None:
    model = _net()
    ours, timms = ModelEma(model, decay=0.9), ModelEmaV3(model, decay=0.9, use_warmup=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 31):  # through the warm-up and past it (decay reaches 0.9 at ~31)
        loss = model(torch.randn(4, 3, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ours.update(step)
        timms.update(model, step=step)
    want = timms.module.state_dict()
    got = ours.module.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert int(got["1.num_batches_tracked"]) == 30  # counters are copied, not averaged
    # The average lags the model: it is not a copy of it.
    assert not torch.equal(got["0.weight"], model.state_dict()["0.weight"])


def test_ema_decay_warms_up_to_its_cap() -> None:
    ema = ModelEma(_net(), decay=0.999)
    assert ema.decay_at(1) == 0.0  # the first update makes the average the model itself
    assert ema.decay_at(2) == 1 - 2 ** (-2 / 3)
    assert ema.decay_at(10**9) == 0.999
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert not ema.module.training


def test_ema_follows_a_state_dict_loaded_into_the_model() -> None:
    """A resume loads last.pt into the model after the EMA was built: loading copies in
    place, so the EMA still follows the model's tensors."""
    model = _net()
    ema = ModelEma(model, decay=0.5)
    other = _net()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    model.load_state_dict(other.state_dict())
    ema.update(1)  # decay 0: the average becomes the model
    for key, value in model.state_dict().items():
        assert torch.equal(ema.module.state_dict()[key], value), key


def test_a_skipped_step_leaves_the_average_as_it_was() -> None:
    """A step skipped as non-finite may have run a forward that wrote NaN into BatchNorm's
    running statistics: the average must not take them in."""
    model = _net()
    ema = ModelEma(model, decay=0.9)
    model(torch.randn(4, 3, 8, 8))
    ema.update(1, skipped=torch.tensor(0.0))
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    model[1].running_mean.fill_(float("nan"))
    model[1].num_batches_tracked += 5
    ema.update(2, skipped=torch.tensor(1.0))
    for key, value in ema.module.state_dict().items():
        assert torch.equal(value, before[key]), key
    model[1].running_mean.zero_()
    ema.update(3, skipped=torch.tensor(0.0))  # a good step moves it again, as without a flag
    reference = ModelEma(model, decay=0.9)
    reference.module.load_state_dict(before)
    reference.update(3)
    for key, value in ema.module.state_dict().items():
        assert torch.equal(value, reference.module.state_dict()[key]), key
