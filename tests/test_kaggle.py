"""The Kaggle path end to end: bundle a tiny trained run, then run the kernel with an
interpreter that has what a Kaggle image has (torch, timm, cv2, pandas...) but neither
segmentation-models-pytorch nor gitract, on a fake /kaggle tree, with the network blocked."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from fnmatch import fnmatch
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from gitract.config import load_config
from gitract.data.layout import scan_images
from gitract.data.rle import rle_decode
from gitract.errors import CheckpointError, DiskFullError, GitractError
from gitract.inference.blend import blend_spec
from gitract.inference.submission import infer_test
from gitract.kaggle.bundle import (
    COMPETITION,
    MANIFEST,
    build_bundle,
    fetch_wheel,
    notebook_from_script,
    run_config,
)
from gitract.kaggle.estimate import RuntimeEstimate, format_estimate
from gitract.training.engine import fit

REPO = Path(__file__).resolve().parents[1]
KERNEL = REPO / "scripts" / "kaggle_kernel.py"
BUILD = REPO / "scripts" / "build_kaggle.py"
FAST = ["data.img_size=[32, 32]", "data.num_workers=0", "train.batch_size=8", "train.epochs=1"]
TUNED = {
    "large_bowel": {"threshold": 0.4},
    "small_bowel": {"threshold": 0.5, "min_size": 5},
    "stomach": {"threshold": 0.6},
}
# What a stock Kaggle image lacks; hidden from the fake interpreter. pip/setuptools are the new
# venv's own; .pth files (the editable gitract finder among them) are never processed there.
HIDDEN = (
    "segmentation_models_pytorch*",
    "monai",
    "monai-*",
    "gitract*",
    "__editable__*",
    "*.pth",
    "pip",
    "pip-*",
    "setuptools*",
    "_distutils_hack",
    "pkg_resources",
)
NO_NETWORK = '''"""Fake Kaggle image: internet off. Logs and refuses every IP connection attempt."""
import os, socket

def _log(what):
    path = os.environ.get("GITRACT_NET_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {what}\\n")

_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex

def _ip(sock):
    return sock.family in (socket.AF_INET, socket.AF_INET6)

def connect(self, address, *a):
    if _ip(self):
        _log(f"connect {address!r}")
        raise OSError(101, "Network is unreachable (fake Kaggle image)")
    return _connect(self, address, *a)

def connect_ex(self, address, *a):
    if _ip(self):
        _log(f"connect_ex {address!r}")
        return 101
    return _connect_ex(self, address, *a)

def getaddrinfo(host, *a, **k):
    _log(f"getaddrinfo {host!r}")
    raise socket.gaierror(-3, "Temporary failure in name resolution (fake Kaggle image)")

socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
socket.getaddrinfo = getaddrinfo
'''


# --------------------------------------------------------------------------- fixtures


@contextlib.contextmanager
def _one_thread():
    """Torch on one thread: on a shared 2-core machine, 2 spinning OpenMP threads per process
    make this tiny training ~8x slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_runs(synthetic_set, tmp_path_factory) -> Path:
    """runs/demo_cpu with folds 0 and 1 (1 epoch at 32x32) and a tuned postprocess.json."""
    cfg = load_config(REPO / "configs" / "demo_cpu.yaml", FAST)
    out = tmp_path_factory.mktemp("kaggle_runs")
    with _one_thread():
        for fold in (0, 1):
            run_dir = fit(
                cfg, fold, synthetic_set.root, synthetic_set.folds_csv, out, progress=False
            )
    runs = run_dir.parent
    (runs / "postprocess.json").write_text(json.dumps(TUNED))
    (runs / "fold0" / "oof.csv").write_text("not bundled\n")
    return runs


@pytest.fixture(scope="module")
def wheel_cache(tmp_path_factory) -> Path:
    """One download of each third-party wheel for every bundle of this module."""
    return tmp_path_factory.mktemp("wheel_cache")


@pytest.fixture(scope="module")
def bundle(trained_runs, wheel_cache, tmp_path_factory):
    base = tmp_path_factory.mktemp("kaggle_dist")
    return build_bundle(
        blend_spec([trained_runs]), base / "dist", REPO, wheel_cache=wheel_cache, user="tester"
    )


@pytest.fixture(scope="module")
def kaggle_python(tmp_path_factory) -> Path:
    """A fresh venv (with pip) that sees this venv's packages minus smp and gitract."""
    base = tmp_path_factory.mktemp("kaggle_image")
    image_site = base / "image-site-packages"
    image_site.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not any(fnmatch(entry.name, pattern) for pattern in HIDDEN):
            (image_site / entry.name).symlink_to(entry)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "kaggle_image.pth").write_text(f"{image_site}\n")
    Path(site, "_no_network.py").write_text(NO_NETWORK)
    Path(site, "_no_network.pth").write_text("import _no_network\n")
    return python


def _kaggle_tree(base: Path, synthetic_set, bundle, dataset_name: str, empty: bool) -> Path:
    """<base>/kaggle: input/<competition> (the synthetic set; public layout when ``empty``),
    input/<dataset_name> (the bundle), working/."""
    root = base / "kaggle"
    data = root / "input" / COMPETITION
    data.mkdir(parents=True)
    (data / "train").symlink_to(synthetic_set.root / "train")  # read by nothing here
    shutil.copy2(synthetic_set.root / "train.csv", data / "train.csv")
    if empty:
        (data / "test").mkdir()
        (data / "sample_submission.csv").write_text("id,class,predicted\n")
    else:
        shutil.copytree(synthetic_set.root / "test", data / "test")
        shutil.copy2(synthetic_set.root / "sample_submission.csv", data / "sample_submission.csv")
    shutil.copytree(bundle.dataset_dir, root / "input" / dataset_name)
    (root / "working").mkdir()
    return root


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _run_kernel(
    python: Path, root: Path, *args: str, threads: int | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "GITRACT_KAGGLE_ROOT": str(root), "GITRACT_NET_LOG": str(root / "net")}
    if threads is not None:  # same reduction order as an in-process run on that many threads
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run(
        [str(python), str(root.parent / "kaggle_kernel.py"), "--no-progress", *args],
        cwd=root / "working", env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _probe(python: Path, cwd: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True)


def _load_kernel_module():
    spec = importlib.util.spec_from_file_location("kaggle_kernel", KERNEL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- the bundle


def test_bundle_holds_wheels_runs_and_metadata(bundle, trained_runs):
    data = bundle.dataset_dir
    wheels = sorted(p.name for p in (data / "wheels").iterdir())
    assert [w.split("-")[0] for w in wheels] == [
        "gitract", "segmentation_models_pytorch", "timm"
    ]  # fmt: skip
    assert all(w.endswith("-py3-none-any.whl") for w in wheels)
    run = data / "runs" / "demo_cpu"
    assert _listing(run) == [
        "fold0", "fold0/best.pt", "fold0/config.yaml",
        "fold1", "fold1/best.pt", "fold1/config.yaml", "postprocess.json",
    ]  # fmt: skip
    assert (run / "fold0" / "best.pt").read_bytes() == (
        trained_runs / "fold0" / "best.pt"
    ).read_bytes()
    assert run_config(run).data.img_size == [32, 32]

    meta = json.loads((data / "dataset-metadata.json").read_text())
    assert meta["id"] == "tester/gitract-bundle" and meta["licenses"]
    manifest = json.loads((data / MANIFEST).read_text())
    assert manifest["folds"] == ["demo_cpu/fold0", "demo_cpu/fold1"]
    assert set(manifest["wheels"]) == set(wheels)
    ensemble = json.loads((data / "ensemble.json").read_text())
    assert ensemble == {
        "members": [{"run": "runs/demo_cpu", "weight": 1.0}],
        "dir": "runs/demo_cpu",
    }

    kernel = json.loads((bundle.kernel_dir / "kernel-metadata.json").read_text())
    assert kernel["competition_sources"] == [COMPETITION]
    assert kernel["dataset_sources"] == ["tester/gitract-bundle"]
    assert kernel["enable_internet"] is False and kernel["enable_gpu"] is True
    code = bundle.kernel_dir / kernel["code_file"]
    cell = json.loads(code.read_text())["cells"]
    assert len(cell) == 1 and "".join(cell[0]["source"]) == KERNEL.read_text()
    assert (bundle.kernel_dir / "kaggle_kernel.py").read_text() == KERNEL.read_text()


def test_fetch_wheel_reuses_the_cache(tmp_path, monkeypatch):
    cached = tmp_path / "Segmentation_Models_PyTorch-9.9.9-py3-none-any.whl"
    cached.write_bytes(b"wheel")

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although the wheel was cached")

    monkeypatch.setattr(subprocess, "run", no_download)
    assert fetch_wheel("segmentation-models-pytorch", "9.9.9", tmp_path) == cached


def test_fetch_wheel_failure_names_the_package(tmp_path, monkeypatch):
    def failed(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", failed)
    with pytest.raises(GitractError, match=r"nopkg==0\.1 .*No matching distribution.*by hand"):
        fetch_wheel("nopkg", "0.1", tmp_path)


def test_build_refuses_runs_without_checkpoints(tmp_path):
    (tmp_path / "runs" / "fold0").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"runs: no <fold>/best\.pt inside"):
        build_bundle(
            blend_spec([tmp_path / "runs"]), tmp_path / "out", REPO, wheel_cache=tmp_path / "c"
        )
    out = tmp_path / "out"
    assert not (out / "kaggle-dataset").exists() and not (out / "kaggle-kernel").exists()


def test_build_on_a_full_disk_is_one_line_and_leaves_no_half_bundle(tmp_path, monkeypatch):
    (tmp_path / "runs" / "fold0").mkdir(parents=True)
    (tmp_path / "runs" / "fold0" / "best.pt").write_bytes(b"weights")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", full)
    out = tmp_path / "out"
    with pytest.raises(DiskFullError, match=r"kaggle-dataset: no space left on the device"):
        build_bundle(blend_spec([tmp_path / "runs"]), out, REPO, wheel_cache=tmp_path / "c")
    assert list(out.iterdir()) == []


def test_build_script_missing_runs_is_one_line(tmp_path):
    missing = tmp_path / "runs" / "nope"
    result = subprocess.run(
        [sys.executable, str(BUILD), "--runs", str(missing), "--out", str(tmp_path / "dist")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: {missing}: runs folder not found (train first, or pass --runs)"
    )
    assert not (tmp_path / "dist" / "kaggle-dataset").exists()


# --------------------------------------------------------------------------- the kernel


def test_fake_kaggle_image_lacks_smp_and_gitract(kaggle_python, tmp_path):
    code = """
import socket
for name in ("segmentation_models_pytorch", "gitract"):
    try:
        __import__(name)
        print("present", name)
    except ModuleNotFoundError:
        print("missing", name)
import torch, timm, cv2, pandas, sklearn, albumentations
try:
    socket.create_connection(("pypi.org", 443), 2)
    print("online")
except OSError as e:
    print("offline", e)
"""
    result = _probe(kaggle_python, tmp_path, code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["missing segmentation_models_pytorch", "missing gitract"]
    assert lines[2].startswith("offline") and "fake Kaggle image" in lines[2]


def test_kernel_on_the_empty_public_test(kaggle_python, bundle, synthetic_set, tmp_path):
    """Kaggle's public re-run: test/ empty, header-only sample -> header-only submission, fast,
    installing gitract from the bundle (first run in this fake image) without any network."""
    root = _kaggle_tree(tmp_path, synthetic_set, bundle, "gitract-bundle", empty=True)
    shutil.copy2(bundle.kernel_dir / "kaggle_kernel.py", tmp_path / "kaggle_kernel.py")
    start = time.perf_counter()
    result = _run_kernel(kaggle_python, root)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert (root / "working" / "submission.csv").read_text() == "id,class,predicted\n"
    assert elapsed < 30, f"empty public test took {elapsed:.1f} s"
    assert not (root / "net").exists(), (root / "net").read_text()


def test_kernel_predicts_the_test_set(kaggle_python, bundle, trained_runs, synthetic_set, tmp_path):
    """Bundle under another dataset name; the submission is exactly what gitract gives here."""
    root = _kaggle_tree(tmp_path, synthetic_set, bundle, "my-weights-v3", empty=False)
    shutil.copy2(bundle.kernel_dir / "kaggle_kernel.py", tmp_path / "kaggle_kernel.py")
    before = _listing(root / "input")
    result = _run_kernel(kaggle_python, root, "--num-workers", "0")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "net").exists(), (root / "net").read_text()
    assert _listing(root / "input") == before  # the read-only input is left alone
    assert any((root / "tmp" / "gitract_cache").iterdir())  # the cache went to <root>/tmp
    assert "my-weights-v3/runs/demo_cpu" in result.stdout

    submission = pd.read_csv(root / "working" / "submission.csv", dtype=str, keep_default_na=False)
    sample = pd.read_csv(synthetic_set.root / "sample_submission.csv", dtype=str)
    assert list(submission.columns) == ["id", "class", "predicted"]
    assert submission[["id", "class"]].equals(sample[["id", "class"]])
    shapes = scan_images(synthetic_set.root / "test").set_index("id")
    for slice_id, rle in zip(submission["id"], submission["predicted"], strict=True):
        hw = (int(shapes.at[slice_id, "height"]), int(shapes.at[slice_id, "width"]))
        numbers = np.array(rle.split(), dtype=np.int64)
        starts, lengths = numbers[0::2], numbers[1::2]
        assert np.all(lengths > 0) and np.all(np.diff(starts) > lengths[:-1])
        assert rle_decode(rle, hw).sum() == lengths.sum()

    # Same code, same answer: the kernel's submission is gitract's own (tuned thresholds).
    with _one_thread():
        local = infer_test(
            run_config(trained_runs),
            synthetic_set.root,
            blend_spec([trained_runs]),
            out=tmp_path / "local.csv",
            progress=False,
        )
    assert (root / "working" / "submission.csv").read_text() == local.read_text()


def test_kernel_without_bundle_is_one_line(tmp_path):
    root = tmp_path / "kaggle"
    (root / "input" / COMPETITION).mkdir(parents=True)
    (root / "input" / COMPETITION / "sample_submission.csv").write_text("id,class,predicted\n")
    (root / "input" / "other-dataset").mkdir()
    (root / "working").mkdir()
    shutil.copy2(KERNEL, tmp_path / "kaggle_kernel.py")
    result = _run_kernel(Path(sys.executable), root)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: no gitract-*.whl in any dataset under {root / 'input'}: add the bundle "
        "dataset (dist/kaggle-dataset, made by `make kaggle`) to this notebook's inputs"
    )


def test_kernel_without_competition_data_is_one_line(tmp_path):
    root = tmp_path / "kaggle"
    (root / "input").mkdir(parents=True)
    (root / "working").mkdir()
    shutil.copy2(KERNEL, tmp_path / "kaggle_kernel.py")
    result = _run_kernel(Path(sys.executable), root)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"error: {root / 'input' / COMPETITION}: no sample_submission.csv "
        "(add the competition's data)"
    )


def test_find_bundle_at_any_name_and_depth(tmp_path):
    kernel = _load_kernel_module()
    wheels = tmp_path / "input" / "anything" / "zipped" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "gitract-0.1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "input" / COMPETITION).mkdir()
    assert kernel.find_bundle(tmp_path / "input") == wheels
    (wheels.parent / "runs" / "r" / "fold3").mkdir(parents=True)
    (wheels.parent / "runs" / "r" / "fold3" / "best.pt").write_bytes(b"")
    assert kernel.find_blend(wheels.parent) == (None, [wheels.parent / "runs" / "r"])

    second = tmp_path / "input" / "another" / "wheels"
    second.mkdir(parents=True)
    (second / "gitract-0.2.0-py3-none-any.whl").write_bytes(b"")
    with pytest.raises(kernel.KernelError, match="several gitract bundles"):
        kernel.find_bundle(tmp_path / "input")


# --------------------------------------------------------------------------- the estimate


def test_estimate_arithmetic():
    est = RuntimeEstimate(25000, 5, 2, 20.0, "Tesla T4", 32, (320, 384), "Unet/efficientnet-b7")
    assert est.forward_passes == 250_000 and est.seconds == 12_500
    text = format_estimate(est)
    assert "25000 slices x 5 folds x 2 views = 250000" in text
    assert "250000 / 20.00 = 12500 s = 3.47 h" in text and "9 h: fits" in text
    slow = RuntimeEstimate(25000, 5, 2, 5.0, "cpu", 2, (320, 384), "Unet/efficientnet-b7")
    assert "does NOT fit" in format_estimate(slow)


def test_estimate_measures_the_runs_model(trained_runs, tmp_path):
    result = subprocess.run(
        [sys.executable, str(KERNEL), "--estimate", "--slices", "1000", "--runs",
         str(trained_runs), "--batches", "1"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "GITRACT_KAGGLE_ROOT": str(tmp_path / "nowhere")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Unet/tu-mobilenetv3_small_100 at 32x32, batch 2, on cpu" in result.stdout
    assert "1000 slices x 2 folds x 2 views = 4000" in result.stdout
    assert not (tmp_path / "nowhere").exists()


def test_notebook_cell_is_the_script():
    nb = notebook_from_script("a = 1\nprint(a)\n")
    assert nb["nbformat"] == 4 and nb["cells"][0]["source"] == ["a = 1\n", "print(a)\n"]


@pytest.mark.parametrize(("timm_version", "with_timm"), [("0.9.16", True), ("1.0.9", False)])
def test_install_is_offline_and_adds_timm_only_when_too_old(
    tmp_path, monkeypatch, timm_version, with_timm
):
    kernel = _load_kernel_module()
    (tmp_path / "timm-1.0.31-py3-none-any.whl").write_bytes(b"")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs["env"]))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(kernel.subprocess, "run", fake_run)
    monkeypatch.setattr(kernel.importlib.metadata, "version", lambda name: timm_version)
    monkeypatch.setenv("PIP_FIND_LINKS", "/somewhere/else")
    monkeypatch.setenv("PIP_INDEX_URL", "https://example.org/simple")
    kernel.install(tmp_path)
    ((cmd, env),) = calls
    assert cmd[1:6] == ["-m", "pip", "install", "--quiet", "--no-index"] and "--no-deps" in cmd
    assert cmd[cmd.index("--find-links") + 1] == str(tmp_path)
    packages = ["gitract", "segmentation-models-pytorch"] + (["timm"] if with_timm else [])
    assert cmd[-len(packages) :] == packages and ("timm" in cmd) == with_timm
    assert env["PIP_CONFIG_FILE"] == os.devnull
    assert "PIP_FIND_LINKS" not in env and "PIP_INDEX_URL" not in env


def test_failed_install_is_one_line(tmp_path, monkeypatch):
    kernel = _load_kernel_module()

    def failed(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(kernel.subprocess, "run", failed)
    with pytest.raises(kernel.KernelError, match=r"offline install from .* failed: ERROR: No"):
        kernel.install(tmp_path)


# --------------------------------------------------------------------------- a 2.5D + 3D blend

BLEND_TUNED = {
    "large_bowel": {"threshold": 0.3},
    "small_bowel": {"threshold": 0.45},
    "stomach": {"threshold": 0.6, "min_size": 10},
}
TINY_3D = [
    "model.kind=3d", "model.arch=UNet", "model.init_filters=4", "data.grid_hw=[32, 32]",
    "data.patch_size=[16, 32, 32]", "data.num_workers=0", "infer.sw_overlap=0.25",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_3d(tmp_path_factory) -> Path:
    """runs/tiny3d, folds 0 and 1: random-init MONAI UNets saved as engine saves best.pt."""
    pytest.importorskip(
        "gitract.models.monai3d", reason="3D runs need gitract.models.monai3d (branch model3d)"
    )
    from gitract.config import config_to_dict
    from gitract.models.monai3d import build_model3d

    cfg = load_config(REPO / "configs" / "demo_cpu.yaml", TINY_3D)
    runs = tmp_path_factory.mktemp("kaggle_3d") / "tiny3d"
    for fold in (0, 1):
        torch.manual_seed(fold)
        model = build_model3d(cfg.model)
        (runs / f"fold{fold}").mkdir(parents=True)
        ckpt = {"model": model.state_dict(), "config": config_to_dict(cfg), "meta": {}}
        torch.save(ckpt, runs / f"fold{fold}" / "best.pt")
    return runs


@pytest.fixture(scope="module")
def blend_bundle(trained_runs, run_3d, wheel_cache, tmp_path_factory):
    base = tmp_path_factory.mktemp("kaggle_blend")
    spec = blend_spec([trained_runs, run_3d], [0.7, 0.3], base / "blend")
    spec.dir.mkdir()
    (spec.dir / "postprocess.json").write_text(json.dumps(BLEND_TUNED))
    info = build_bundle(spec, base / "dist", REPO, wheel_cache=wheel_cache, user="tester")
    return SimpleNamespace(info=info, spec=spec)


def test_blend_bundle_carries_every_run_weights_and_monai(blend_bundle, trained_runs, run_3d):
    data = blend_bundle.info.dataset_dir
    wheels = sorted(p.name.split("-")[0] for p in (data / "wheels").iterdir())
    assert wheels == ["gitract", "monai", "segmentation_models_pytorch", "timm"]
    assert all(p.name.endswith("-py3-none-any.whl") for p in (data / "wheels").iterdir())
    assert _listing(data / "runs") == [
        "demo_cpu", "demo_cpu/fold0", "demo_cpu/fold0/best.pt", "demo_cpu/fold0/config.yaml",
        "demo_cpu/fold1", "demo_cpu/fold1/best.pt", "demo_cpu/fold1/config.yaml",
        "demo_cpu/postprocess.json",
        "tiny3d", "tiny3d/fold0", "tiny3d/fold0/best.pt", "tiny3d/fold1", "tiny3d/fold1/best.pt",
    ]  # fmt: skip
    ensemble = json.loads((data / "ensemble.json").read_text())
    assert ensemble["members"] == [
        {"run": "runs/demo_cpu", "weight": 0.7},
        {"run": "runs/tiny3d", "weight": 0.3},
    ]
    assert json.loads((data / "postprocess.json").read_text()) == BLEND_TUNED
    manifest = json.loads((data / MANIFEST).read_text())
    assert manifest["runs"] == ["demo_cpu", "tiny3d"] and "monai" in manifest["install"]
    assert manifest["folds"] == [
        "demo_cpu/fold0", "demo_cpu/fold1", "tiny3d/fold0", "tiny3d/fold1"
    ]  # fmt: skip


def test_kernel_predicts_with_a_2d_3d_blend_offline(
    kaggle_python, blend_bundle, synthetic_set, tmp_path
):
    """The fake image lacks smp, gitract and MONAI: all come from the bundle, no network; the
    submission is gitract's own blend of the same runs with the blend's tuned settings."""
    root = _kaggle_tree(tmp_path, synthetic_set, blend_bundle.info, "blend-v1", empty=False)
    shutil.copy2(blend_bundle.info.kernel_dir / "kaggle_kernel.py", tmp_path / "kaggle_kernel.py")
    result = _run_kernel(kaggle_python, root, "--num-workers", "0", threads=1)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "net").exists(), (root / "net").read_text()
    assert "demo_cpu x 0.7 + " in result.stdout and "tiny3d x 0.3" in result.stdout

    submission = pd.read_csv(root / "working" / "submission.csv", dtype=str, keep_default_na=False)
    sample = pd.read_csv(synthetic_set.root / "sample_submission.csv", dtype=str)
    assert submission[["id", "class"]].equals(sample[["id", "class"]])
    shapes = scan_images(synthetic_set.root / "test").set_index("id")
    for slice_id, rle in zip(submission["id"], submission["predicted"], strict=True):
        hw = (int(shapes.at[slice_id, "height"]), int(shapes.at[slice_id, "width"]))
        rle_decode(rle, hw)

    with _one_thread():
        local = infer_test(
            run_config(blend_bundle.spec.members[0].run), synthetic_set.root,
            blend_bundle.spec, out=tmp_path / "local.csv", progress=False,
        )  # fmt: skip
    assert (root / "working" / "submission.csv").read_text() == local.read_text()


def test_estimate_counts_each_members_passes_and_flops(trained_runs, run_3d, tmp_path):
    result = subprocess.run(
        [sys.executable, str(KERNEL), "--estimate", "--slices", "1000", "--case-days", "10",
         "--runs", str(trained_runs), str(run_3d), "--tflops-3d", "2"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "GITRACT_KAGGLE_ROOT": str(tmp_path / "nowhere")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "an estimate" in out and "3d 2 TFLOP/s" in out
    # 2.5D: slices x folds x views; 3D: 10 case-days of 100 slices, windows of 16 with a
    # stride of 12 -> 8 along z, 1 in-plane (the 32 x 32 grid is one window): 80 tiles.
    assert "1000 slices x 2 folds x 2 views = 4000 passes" in out
    assert "80 tiles x 2 folds x 2 views = 320 passes" in out
    assert "blend total" in out and "9 h: fits" in out


def test_sliding_window_tiles_match_monai():
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    from gitract.models.kind3d import sliding_window_tiles

    for shape, patch, overlap in [
        ((144, 256, 256), (80, 160, 160), 0.5), ((80, 256, 256), (80, 160, 160), 0.5),
        ((147, 256, 256), (80, 160, 160), 0.25), ((20, 32, 32), (16, 32, 32), 0.25),
        ((10, 40, 50), (16, 32, 32), 0.6),
    ]:  # fmt: skip
        padded = tuple(max(s, p) for s, p in zip(shape, patch, strict=True))
        interval = _get_scan_interval(padded, patch, 3, (overlap,) * 3)
        want = len(dense_patch_slices(padded, patch, interval))
        assert sliding_window_tiles(shape, patch, overlap) == want, (shape, patch, overlap)


def test_count_flops_of_a_known_convolution():
    from gitract.kaggle.estimate import count_flops

    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_flops(conv, (1, 3, 10, 10)) == 2 * 8 * 3 * 9 * 100  # 2 x multiply-adds
    assert conv.weight.device.type == "cpu"  # counted on a copy
