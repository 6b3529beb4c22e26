"""Model building (smp), local/named encoder weights without internet, checkpoint loading."""

from __future__ import annotations

import os
import time
import urllib.error
from pathlib import Path

import pytest
import torch

from gitract.config import Config, ModelConfig, config_to_dict, load_config
from gitract.errors import CheckpointError, ConfigError
from gitract.models import smp2d as model_mod
from gitract.models.checkpoint import load_checkpoint
from gitract.models.kind2d import KIND_2D
from gitract.models.smp2d import build_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = ModelConfig(arch="Unet", encoder_name="resnet18", encoder_weights=None)


@pytest.fixture
def offline(monkeypatch):
    """Force huggingface_hub's offline mode: a download fails at once, whatever the network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_default_b7_unet_forward_backward_on_cpu():
    cfg = load_config(ROOT / "configs" / "default.yaml", ["model.encoder_weights=null"])
    torch.manual_seed(0)
    net = build_model(cfg.model, in_channels=cfg.data.n_slices, classes=3)
    x = torch.randn(2, 3, 64, 64)
    out = net(x)
    assert out.shape == (2, 3, 64, 64)
    out.float().pow(2).mean().backward()
    stem = next(m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.in_channels == 3
    assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0


def test_first_place_2d_recipe_builds_and_trains_a_step_on_cpu():
    # configs/recipe_1st_2d.yaml names timm's noisy-student B7: random init here (offline).
    cfg = load_config(ROOT / "configs" / "recipe_1st_2d.yaml", ["model.encoder_weights=null"])
    assert cfg.model.encoder_name == "tu-tf_efficientnet_b7.ns_jft_in1k"
    torch.manual_seed(0)
    net = KIND_2D.build(cfg)
    x = torch.randn(2, cfg.data.in_channels, 64, 96)  # any multiple of 32: crops and canvas
    out = net(x)
    assert out.shape == (2, 3, 64, 96)
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_demo_cpu_model_builds_and_runs():
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml")
    net = build_model(cfg.model, in_channels=cfg.data.n_slices).eval()
    with torch.no_grad():
        out = net(torch.randn(1, cfg.data.n_slices, *cfg.data.img_size))
    assert out.shape == (1, 3, *cfg.data.img_size)


def test_other_arch_and_in_channels():
    net = build_model(
        ModelConfig(arch="FPN", encoder_name="resnet18", encoder_weights=None),
        in_channels=5,
        classes=2,
    ).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 5, 64, 64)).shape == (1, 2, 64, 64)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            ModelConfig(arch="Unte", encoder_name="resnet18", encoder_weights=None),
            "model.arch: unknown architecture 'Unte' (did you",
        ),
        (
            ModelConfig(arch="Unet", encoder_name="resnet19", encoder_weights=None),
            "model.encoder_name: unknown encoder 'resnet19'",
        ),
        (
            ModelConfig(arch="Unet", encoder_name="tu-nosuchnet", encoder_weights=None),
            "model.encoder_name: timm has no model",
        ),
        (
            ModelConfig(arch="Unet", encoder_name="tu-efficientnet_b7", encoder_weights="imagenet"),
            "model.encoder_weights: timm has no pretrained weights for 'efficientnet_b7'",
        ),
        (
            ModelConfig(arch="Unet", encoder_name="resnet18", encoder_weights="imagenet22k"),
            "model.encoder_weights: unknown weights 'imagenet22k' for encoder 'resnet18'",
        ),
    ],
)
def test_unknown_names(cfg, message):
    with pytest.raises(ConfigError) as e:
        build_model(cfg, in_channels=3)
    assert str(e.value).startswith(message)


def test_imagenet_weights_unavailable_fail_fast_with_hint(offline):
    cfg = load_config(ROOT / "configs" / "default.yaml")  # efficientnet-b7, imagenet
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        build_model(cfg.model, in_channels=3)
    assert time.perf_counter() - start < 20
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(
        "model.encoder_weights: cannot fetch 'imagenet' weights for encoder 'efficientnet-b7'"
    )
    assert "--set model.encoder_weights=/path/to/encoder.pth" in msg and "null" in msg


def test_offline_mode_fails_fast_for_a_timm_encoder_too(offline):
    """With HF_HUB_OFFLINE=1 the build fails at once with the one-line error. Without internet
    and without it, huggingface_hub retries for ~25 s first (one exception path, no probe)."""
    start = time.perf_counter()
    with pytest.raises(
        ConfigError, match="cannot fetch 'imagenet' weights for encoder 'tu-resnet18'"
    ):
        build_model(
            ModelConfig(arch="Unet", encoder_name="tu-resnet18", encoder_weights="imagenet"),
            in_channels=3,
        )
    assert time.perf_counter() - start < 20


def _hub_returns(monkeypatch, fake) -> None:
    """smp's (and timm's) hf_hub_download call ``fake`` instead of the network."""
    import segmentation_models_pytorch.encoders as smp_encoders
    import timm.models._hub as timm_hub

    monkeypatch.setattr(smp_encoders, "hf_hub_download", fake)
    monkeypatch.setattr(timm_hub, "hf_hub_download", fake)


def test_download_error_becomes_config_error(monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    _hub_returns(monkeypatch, no_network)
    with pytest.raises(ConfigError) as e:
        build_model(
            ModelConfig(arch="Unet", encoder_name="resnet18", encoder_weights="imagenet"),
            in_channels=3,
        )
    msg = str(e.value)
    assert msg.startswith("model.encoder_weights: cannot fetch 'imagenet' weights for encoder")
    assert "(no internet? URLError: <urlopen error [Errno -2] Name or service" in msg
    assert "; put the encoder's state" in msg and "\n" not in msg


def test_unwritable_cache_is_a_failed_download_but_not_no_internet(monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/home/u/.cache/huggingface/hub")

    _hub_returns(monkeypatch, read_only)
    with pytest.raises(ConfigError) as e:
        build_model(
            ModelConfig(arch="Unet", encoder_name="resnet18", encoder_weights="imagenet"),
            in_channels=3,
        )
    assert (
        "cannot fetch 'imagenet' weights for encoder 'resnet18' (PermissionError: [Errno 13]"
        in str(e.value)
    )
    assert "no internet" not in str(e.value)


@pytest.mark.parametrize(
    ("encoder", "content"),
    [
        ("resnet18", b"\x08\x00\x00\x00\x00\x00\x00\x00{truncated"),  # safetensors header
        ("tu-resnet18", b"not a zip archive at all"),
    ],
)
def test_corrupt_cached_weights_are_named_not_blamed_on_the_network(
    tmp_path, monkeypatch, encoder, content
):
    import huggingface_hub

    corrupt = tmp_path / "model.safetensors"
    corrupt.write_bytes(content)
    _hub_returns(monkeypatch, lambda *args, **kwargs: str(corrupt))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: str(corrupt))
    with pytest.raises(ConfigError) as e:
        build_model(
            ModelConfig(arch="Unet", encoder_name=encoder, encoder_weights="imagenet"),
            in_channels=3,
        )
    msg = str(e.value)
    assert msg.startswith(
        f"model.encoder_weights: 'imagenet' weights for encoder '{encoder}': "
        f"the cached file {corrupt} is corrupt or truncated ("
    )
    assert msg.endswith("delete it to download it again")
    assert "cannot fetch" not in msg and "no internet" not in msg and "\n" not in msg


def test_weights_that_do_not_fit_the_encoder_say_so(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    other = build_model(
        ModelConfig(arch="Unet", encoder_name="resnet34", encoder_weights=None), in_channels=3
    ).encoder
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    _hub_returns(monkeypatch, lambda *args, **kwargs: str(path))
    with pytest.raises(ConfigError) as e:
        build_model(
            ModelConfig(arch="Unet", encoder_name="resnet18", encoder_weights="imagenet"),
            in_channels=3,
        )
    msg = str(e.value)
    assert msg.startswith(
        "model.encoder_weights: 'imagenet' weights for encoder 'resnet18' do not fit the encoder "
        "(RuntimeError: Error(s) in loading state_dict"
    )
    assert "cannot fetch" not in msg


def test_other_errors_while_building_are_not_disguised(monkeypatch):
    import segmentation_models_pytorch as smp

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(smp, "create_model", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        build_model(
            ModelConfig(arch="Unet", encoder_name="resnet18", encoder_weights="imagenet"),
            in_channels=3,
        )


# --------------------------------------------------------------- modules the forward never calls

# One small member of each encoder family a shipped config uses (default.yaml: smp
# efficientnet-b7; demo_cpu.yaml: tu-mobilenetv3_small_100), and timm-efficientnet, whose
# smp wrapper keeps an unused head as well.
FAMILIES = ["efficientnet-b0", "tu-mobilenetv3_small_100", "timm-efficientnet-b0"]


@pytest.mark.parametrize("encoder", FAMILIES)
def test_every_parameter_gets_a_gradient(encoder):
    torch.manual_seed(0)
    net = build_model(
        ModelConfig(arch="Unet", encoder_name=encoder, encoder_weights=None), in_channels=3
    ).train()
    net(torch.randn(2, 3, 64, 64)).pow(2).mean().backward()
    without = [name for name, p in net.named_parameters() if p.grad is None]
    assert without == []


def test_efficientnet_head_is_dropped_and_old_checkpoints_still_load(tmp_path):
    import segmentation_models_pytorch as smp

    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", ["model.encoder_name=efficientnet-b0"])
    torch.manual_seed(0)
    old = smp.create_model("Unet", "efficientnet-b0", None, in_channels=3, classes=3)
    old_keys = set(old.state_dict())
    assert {"encoder._conv_head.weight", "encoder._bn1.running_var"} <= old_keys
    net = build_model(cfg.model, in_channels=3)
    assert isinstance(net.encoder._conv_head, model_mod.DroppedModule)
    new_keys = set(net.state_dict())
    assert new_keys == {
        k for k in old_keys if not k.startswith(("encoder._conv_head.", "encoder._bn1."))
    }
    with pytest.raises(RuntimeError, match="dropped the encoder's unused module '_conv_head'"):
        net.encoder._conv_head(torch.zeros(1))

    # A checkpoint written before the heads were dropped loads.
    path = _checkpoint(tmp_path, cfg, old.eval())
    again, _ = KIND_2D.load(load_checkpoint(path), source=path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), old(x))

    # So does an encoder file that still holds them (smp-hub's model.safetensors does).
    enc_path = tmp_path / "encoder.pth"
    torch.save(old.encoder.state_dict(), enc_path)
    local = build_model(cfg.model.model_copy(update={"encoder_weights": str(enc_path)}), 3)
    assert torch.equal(local.encoder._conv_stem.weight, old.encoder._conv_stem.weight)


def test_dropping_leaves_no_trace_on_statistics_or_random_numbers():
    torch.manual_seed(5)
    reference = torch.rand(3)
    torch.manual_seed(5)
    net = build_model(
        ModelConfig(arch="Unet", encoder_name="efficientnet-b0", encoder_weights=None),
        in_channels=3,
    )
    after = torch.rand(3)
    torch.manual_seed(5)
    import segmentation_models_pytorch as smp

    plain = smp.create_model("Unet", "efficientnet-b0", None, in_channels=3, classes=3)
    assert torch.equal(after, torch.rand(3)) and not torch.equal(after, reference)
    assert net.training
    mine = net.state_dict()
    for key, value in plain.state_dict().items():
        if key in mine:
            assert torch.equal(mine[key], value), key


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_encoder_weights_are_loaded(tmp_path, suffix):
    torch.manual_seed(1)
    source = build_model(SMALL, in_channels=3)
    path = tmp_path / f"resnet18{suffix}"
    state = source.encoder.state_dict()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(2)
    net = build_model(SMALL.model_copy(update={"encoder_weights": str(path)}), in_channels=3)
    assert torch.equal(net.encoder.conv1.weight, source.encoder.conv1.weight)
    assert torch.equal(
        net.encoder.layer4[1].bn2.running_var, source.encoder.layer4[1].bn2.running_var
    )


def test_local_rgb_weights_are_adapted_to_more_slices(tmp_path):
    source = build_model(SMALL, in_channels=3)
    path = tmp_path / "enc.pth"
    torch.save(source.encoder.state_dict(), path)
    net = build_model(SMALL.model_copy(update={"encoder_weights": str(path)}), in_channels=5)
    w3, w5 = source.encoder.conv1.weight, net.encoder.conv1.weight
    assert w5.shape[1] == 5
    assert torch.allclose(w5[:, 3], w3[:, 0] * 3 / 5)  # smp's rule: cycle RGB, rescale


def test_local_weights_errors_name_the_file(tmp_path):
    other = build_model(
        ModelConfig(arch="Unet", encoder_name="mobilenet_v2", encoder_weights=None), in_channels=3
    )
    path = tmp_path / "mobilenet.pth"
    torch.save(other.encoder.state_dict(), path)
    with pytest.raises(ConfigError) as e:
        build_model(SMALL.model_copy(update={"encoder_weights": str(path)}), in_channels=3)
    assert str(e.value).startswith(
        f"model.encoder_weights {path}: does not fit encoder 'resnet18': "
    )
    assert "missing" in str(e.value) and "unexpected keys" in str(e.value)

    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match=f"model.encoder_weights {missing}: file not found"):
        build_model(SMALL.model_copy(update={"encoder_weights": str(missing)}), in_channels=3)

    evil = tmp_path / "evil.pth"
    torch.save({"x": os.system}, evil)
    with pytest.raises(
        ConfigError, match=r"evil\.pth: refused: it holds pickled objects \(\w+\.system\)"
    ):
        build_model(SMALL.model_copy(update={"encoder_weights": str(evil)}), in_channels=3)


def _checkpoint(tmp_path: Path, cfg: Config, net: torch.nn.Module) -> Path:
    path = tmp_path / "best.pt"
    torch.save({"model": net.state_dict(), "config": config_to_dict(cfg), "epoch": 3}, path)
    return path


def test_checkpoint_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml")
    net = build_model(cfg.model, in_channels=cfg.data.n_slices).eval()
    path = _checkpoint(tmp_path, cfg, net)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3
    again, cfg2 = KIND_2D.load(ckpt, source=path)
    assert cfg2 == cfg and not again.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))


def test_checkpoint_never_downloads(tmp_path, offline):
    """The config inside says imagenet, but a checkpoint has every weight: build with None."""
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", ["model.encoder_weights=imagenet"])
    net = build_model(cfg.model.model_copy(update={"encoder_weights": None}), in_channels=3)
    model, _ = KIND_2D.load(load_checkpoint(_checkpoint(tmp_path, cfg, net)))
    for mine, theirs in zip(model.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)


def test_checkpoint_that_does_not_match_its_config(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo_cpu.yaml", ["model.encoder_name=resnet34"])
    assert SMALL.encoder_name == "resnet18"
    net = build_model(SMALL, in_channels=3)  # resnet18 weights, resnet34 config
    path = _checkpoint(tmp_path, cfg, net)
    with pytest.raises(CheckpointError) as e:
        KIND_2D.load(load_checkpoint(path), source=path)
    msg = str(e.value)
    assert msg.startswith(f"checkpoint {path}: weights do not match its config (Unet/resnet34): ")
    assert "missing, 0 unexpected keys, e.g. missing 'encoder.layer1.2." in msg


def test_checkpoint_with_invalid_config_or_entries(tmp_path):
    net = build_model(SMALL, in_channels=3)
    bad = config_to_dict(Config())
    bad["train"]["epoch"] = 1
    with pytest.raises(
        CheckpointError, match=r"^checkpoint ck\.pt config: unknown key 'train\.epoch'"
    ):
        KIND_2D.load({"model": net.state_dict(), "config": bad}, source="ck.pt")
    with pytest.raises(CheckpointError, match=r"^checkpoint: no 'config' entry"):
        KIND_2D.load({"model": net.state_dict()})


def test_load_checkpoint_refuses_pickled_callables(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": os.system}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(
        f"checkpoint {path}: refused: it holds pickled objects (posix.system)"
    )


def test_load_checkpoint_missing_or_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.pt: file not found"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable torch file"):
        load_checkpoint(junk)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), tensor)
    with pytest.raises(CheckpointError, match=r"tensor\.pt: expected a dict, got Tensor"):
        load_checkpoint(tensor)
