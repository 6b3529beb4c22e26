"""Dependency floors: pyproject.toml and the import-time check agree, and an old package is
refused with one line."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

from gitract import _versions

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_floors_equal_the_import_check() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.MULTILINE | re.DOTALL)
    assert block, "no dependencies list in pyproject.toml"
    deps = re.findall(r'^\s*"([^"]+)"', block[1], re.MULTILINE)
    floors = {}
    for dep in deps:
        found = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep.replace(" ", ""))
        assert found, f"{dep}: a '>=' floor only, no pins or upper bounds"
        floors[found[1].lower()] = found[2]
    for names, (floor, _) in _versions.MINIMUM.items():
        listed = [floors[n] for n in names if n in floors]
        assert listed == [floor], f"{names[0]}: pyproject {listed}, check {floor}"
    assert floors["torch"] == "2.3" and floors["albumentations"] == "2.0"


def test_installed_versions_pass() -> None:
    _versions.check_versions()


@pytest.mark.parametrize(
    ("version", "ok"), [("2.2.2", False), ("2.3.0", True), ("2.15.0+cu132", True), ("1.13", False)]
)
def test_an_old_package_is_refused_with_one_line(monkeypatch, version: str, ok: bool) -> None:
    real = metadata.version
    monkeypatch.setattr(
        _versions.metadata, "version", lambda name: version if name == "torch" else real(name)
    )
    if ok:
        _versions.check_versions()
        return
    with pytest.raises(ImportError) as e:
        _versions.check_versions()
    assert str(e.value) == (
        f'gitract needs torch>=2.3 (torch.amp.GradScaler("cuda")), found {version}: '
        "pip install -U 'torch>=2.3'"
    )
