"""Config loading: both shipped configs, strict keys and types, overrides, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gitract.config import (
    CONFIG_DIR,
    Config,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from gitract.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.yaml"
DEMO = ROOT / "configs" / "demo_cpu.yaml"


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_config_dir_is_the_repo_configs():
    assert CONFIG_DIR == ROOT / "configs"


def test_default_yaml_loads_and_equals_dataclass_defaults():
    cfg = load_config(DEFAULT)
    assert cfg.name == "default"
    assert cfg.model.arch == "Unet"
    assert cfg.model.encoder_name == "efficientnet-b7"
    assert cfg.model.encoder_weights == "imagenet"
    assert (cfg.data.n_slices, cfg.data.slice_stride) == (3, 2)
    assert cfg.data.img_size == [320, 384] and cfg.data.resize_mode == "pad"
    assert cfg.train.amp is True and isinstance(cfg.train.lr, float)
    # The dataclass defaults are documented as default.yaml's values: keep them in sync.
    assert cfg == Config()


def test_demo_cpu_yaml_loads():
    cfg = load_config(DEMO)
    assert cfg.name == "demo_cpu"
    assert cfg.model.encoder_weights is None
    assert cfg.data.img_size == [128, 128] and cfg.data.resize_mode == "pad"
    assert cfg.train.amp is False and cfg.train.batch_size == 16 and cfg.data.num_workers == 2


def test_yaml_name_wins_over_file_stem(tmp_path):
    assert load_config(write(tmp_path, "name: exp1\n")).name == "exp1"
    assert load_config(write(tmp_path, "train: {epochs: 2}\n", "b7_long.yaml")).name == "b7_long"


def test_missing_keys_keep_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  epochs: 3\n"))
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == Config().train.batch_size
    assert cfg.infer == Config().infer


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: unknown key 'train.epoch' (did you mean 'train.epochs'?)"


def test_unknown_section(tmp_path):
    path = write(tmp_path, "trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: unknown key 'trian' \(did you mean 'train'"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("train:\n  epochs: '15'\n", r"'train\.epochs' must be int, got '15' \(str\)"),
        ("train:\n  epochs: 1.5\n", r"'train\.epochs' must be int, got 1\.5 \(float\)"),
        ("train:\n  epochs: true\n", r"'train\.epochs' must be int, got True \(bool\)"),
        ("train:\n  lr: true\n", r"'train\.lr' must be float, got True"),
        ("train:\n  amp: 1\n", r"'train\.amp' must be bool, got 1 \(int\)"),
        ("train:\n  lr: null\n", r"'train\.lr' must be float, got None"),
        ("model:\n  encoder_name: null\n", r"'model\.encoder_name' must be str, got None"),
        ("data:\n  img_size: 320\n", r"'data\.img_size' must be list\[int\], got 320"),
        ("data:\n  img_size: [320, x]\n", r"'data\.img_size\[1\]' must be int, got 'x'"),
        ("data:\n  resize_mode: crop\n", r"'data\.resize_mode' must be 'pad' \| 'resize'"),
        ("infer:\n  tta_flips: [hflip, rot90]\n", r"'infer\.tta_flips\[1\]' must be 'hflip'"),
        ("train: 3\n", r"section 'train' must be a mapping"),
        ("- 1\n- 2\n", r"expected a mapping of sections, got list"),
        ("", r"the config file is empty; it needs sections such as model:"),
        ("# nothing but a comment\n", r"the config file is empty"),
        ("name: 5\n", r"'name' must be str, got 5"),
    ],
)
def test_wrong_type_names_key_type_and_value(tmp_path, text, pattern):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as e:
        load_config(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_numbers_are_widened_and_yaml_exponents_accepted(tmp_path):
    # int where float is expected is fine; PyYAML reads "1e-3" as a str: taken as a float.
    cfg = load_config(write(tmp_path, "train:\n  lr: 1\n  min_lr: 1e-6\n  grad_clip: null\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.min_lr == 1e-6
    assert cfg.train.grad_clip is None


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("train: {epochs: 0}", r"'train\.epochs' must be >= 1, got 0"),
        ("train: {batch_size: -2}", r"'train\.batch_size' must be >= 1, got -2"),
        ("data: {n_slices: 4}", r"'data\.n_slices' must be an odd integer >= 1, got 4"),
        ("data: {n_slices: 0}", r"'data\.n_slices' must be an odd integer >= 1, got 0"),
        ("data: {img_size: [320, 300]}", r"'data\.img_size' must be \[H, W\], two positive"),
        ("data: {img_size: [320]}", r"'data\.img_size' must be \[H, W\]"),
        (
            "postprocess: {stomach: {threshold: 0.0}}",
            r"'postprocess\.stomach\.threshold' must be in \(0, 1\)",
        ),
        ("postprocess: {large_bowel: {threshold: 1.0}}", r"'postprocess\.large_bowel\.threshold'"),
        ("train: {aug_hflip: 1.5}", r"'train\.aug_hflip' must be a probability in \[0, 1\]"),
        ("train: {lr: 0.0}", r"'train\.lr' must be > 0, got 0\.0"),
        ("infer: {tta_flips: [hflip, hflip]}", r"'infer\.tta_flips' must be a list without"),
    ],
)
def test_out_of_range_values(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, text + "\n"))


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"x\.yaml: invalid YAML at line \d+: "):
        load_config(write(tmp_path, "train:\n  epochs: [1\n"))


def test_overrides_are_applied_and_parsed_as_yaml():
    cfg = load_config(
        DEFAULT,
        [
            "train.epochs=3",
            "train.lr=1e-3",
            "model.encoder_weights=null",
            "data.img_size=[256, 256]",
            "infer.tta_flips=[]",
            "train.amp=false",
            "data.root=/tmp/data",
            "name=quick",
        ],
    )
    assert cfg.train.epochs == 3 and cfg.train.lr == 1e-3
    assert cfg.model.encoder_weights is None
    assert cfg.data.img_size == [256, 256]
    assert cfg.infer.tta_flips == [] and cfg.train.amp is False
    assert cfg.data.root == "/tmp/data" and cfg.name == "quick"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=three", "--set train.epochs=three: 'train.epochs' must be int, got 'three'"),
        ("train.epoch=3", "--set train.epoch=3: unknown key 'train.epoch' (did you mean"),
        ("trian.epochs=3", "--set trian.epochs=3: unknown key 'trian' (did you mean 'train'?)"),
        ("train.epochs", "--set train.epochs: expected section.key=value"),
        ("epochs=3", "--set epochs=3: expected section.key=value"),
        ("train.x.y=3", "--set train.x.y=3: expected section.key=value"),
        ("train.epochs=[1", "--set train.epochs=[1: value is not valid YAML"),
    ],
)
def test_bad_overrides_name_the_override(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT, [override])
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_override_ranges_are_checked_on_the_final_config():
    cfg = load_config(DEFAULT, ["train.lr=1e-7", "train.min_lr=0"])  # valid only together
    assert (cfg.train.lr, cfg.train.min_lr) == (1e-7, 0.0)
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT, ["train.epochs=3", "data.n_slices=2"])
    assert str(e.value) == (
        f"{DEFAULT} with --set train.epochs=3 data.n_slices=2: "
        "'data.n_slices' must be an odd integer >= 1, got 2"
    )


def test_dict_round_trip():
    cfg = load_config(DEMO, ["train.epochs=2"])
    d = config_to_dict(cfg)
    assert list(d) == ["name", "data", "model", "train", "infer", "postprocess"]
    assert d["train"]["epochs"] == 2
    again = config_from_dict(d)
    assert again == cfg
    assert config_to_dict(again) == d
    assert config_from_dict(d, name="other").name == "other"
    # The dict is plain data: what a weights_only checkpoint and safe_dump can hold.
    assert yaml.safe_load(yaml.safe_dump(d)) == d


def test_from_dict_validates_like_a_file():
    d = config_to_dict(Config())
    d["train"]["epochs"] = "ten"
    with pytest.raises(ConfigError, match=r"^ckpt: 'train\.epochs' must be int"):
        config_from_dict(d, source="ckpt")
    d = config_to_dict(Config())
    d["train"]["epoch"] = 3
    with pytest.raises(ConfigError, match=r"^config: unknown key 'train\.epoch'"):
        config_from_dict(d)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(DEFAULT, ["train.epochs=4", "infer.out=sub.csv"]).model_copy()
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg  # the saved name wins over the file stem "config"
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left


def test_save_config_overwrites_atomically(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(Config(name="a"), path)
    save_config(Config(name="b"), path)
    assert load_config(path).name == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.patch_size=[80, 150, 160]", "'data.patch_size' must be [D, H, W], three positive"),
        ("train.ema_decay=1.5", "'train.ema_decay' must be in (0, 1) or null"),
        ("infer.sw_overlap=1.0", "'infer.sw_overlap' must be in [0, 1)"),
        ("train.accumulate=0", "'train.accumulate' must be >= 1"),
        ("train.amp_dtype=fp8", "'train.amp_dtype' must be 'fp16' | 'bf16'"),
    ],
)
def test_new_training_keys_are_checked(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT, [override])
    assert message in str(err.value)


def test_configs_saved_before_pydantic_still_load(tmp_path):
    # Written by the dataclass version (commit 413bf7c) with save_config: run folders and
    # checkpoints of older runs hold exactly this. Its post-processing form (infer.thresholds,
    # per-class lists) was replaced by one schema per class (issue 16): a one-line error naming
    # the key; every other section still loads as written.
    old = ROOT / "tests" / "fixtures" / "config_written_by_v0.1.yaml"
    with pytest.raises(ConfigError, match=r"v0\.1\.yaml: unknown key 'infer\.thresholds'"):
        load_config(old)
    saved = yaml.safe_load(old.read_text())
    del saved["infer"]["thresholds"], saved["infer"]["min_component_size"]
    saved["postprocess"] = {"large_bowel": {"threshold": 0.4}, "stomach": {"threshold": 0.6}}
    cfg = config_from_dict(saved, source="ckpt")
    assert cfg.name == "demo_cpu" and cfg.train.ema_decay == 0.99
    assert [p.threshold for p in cfg.postprocess.per_class()] == [0.4, 0.5, 0.6]
    again = config_to_dict(cfg)
    assert again["train"].pop("val_every") == 1  # keys added later: their defaults
    assert again["data"].pop("train_crop") is None
    assert again["model"].pop("norm") is None and again["model"].pop("act") is None
    assert {k: v for k, v in again.items() if k != "postprocess"} == {
        k: v for k, v in saved.items() if k != "postprocess"
    }
    assert config_from_dict(again, source="ckpt") == cfg


def test_empty_sections_keep_their_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "train:\n  # epochs: 3\ninfer:\n"))
    assert cfg.train == Config().train and cfg.infer == Config().infer


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_in_configs_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem
    if cfg.model.kind == "3d":
        assert cfg.data.train_crop is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train_crop=[448, 450]"], "'data.train_crop' must be null or [H, W], two positive "
         "multiples of 32 (the U-Net halves the size 5 times), got [448, 450]"),
        (["data.train_crop=[448]"], "'data.train_crop' must be null or [H, W], two positive"),
        (["data.train_crop=[0, 64]"], "'data.train_crop' must be null or [H, W], two positive"),
        (["data.train_crop=[352, 384]"],
         "must be null or [H, W] within data.img_size [320, 384], got [352, 384]"),
        (["data.img_size=[640, 640]", "data.train_crop=[448, 672]"],
         "must be null or [H, W] within data.img_size [640, 640], got [448, 672]"),
        (["data.train_crop=448"], "'data.train_crop' must be list[int] | None, got 448 (int)"),
        (["model.kind=3d", "model.arch=SegResNet", "data.train_crop=[64, 64]"],
         "data.train_crop: a 2.5D option (a 3D model trains on data.patch_size patches), "
         "got [64, 64]; set it to null"),
    ],
)  # fmt: skip
def test_train_crop_is_checked(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_train_crop_fits_its_canvas() -> None:
    cfg = load_config(DEFAULT, ["data.img_size=[640, 640]", "data.train_crop=[448, 640]"])
    assert cfg.data.train_crop == [448, 640]
    assert load_config(DEFAULT, ["data.train_crop=[320, 384]"]).data.train_crop == [320, 384]
    assert load_config(DEFAULT, ["data.train_crop=null"]).data.train_crop is None
