"""The package's own metadata: a build that warns today fails with a newer setuptools later."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_builds_without_deprecation_warnings_and_carries_the_license(tmp_path) -> None:
    """pyproject.toml in the current metadata form: an SPDX license string and license-files
    (a TOML-table license stops building with setuptools releases after 2027-02-18)."""
    tree = tmp_path / "src"
    shutil.copytree(ROOT / "gitract", tree / "gitract")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-index"]
    cmd += ["--no-build-isolation", "--wheel-dir", str(tmp_path / "out"), str(tree)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert "DeprecationWarning" not in log and "deprecated" not in log.lower(), log[-3000:]
    (wheel,) = (tmp_path / "out").glob("gitract-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(meta).decode()
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in archive.namelist())
        packed = {n for n in archive.namelist() if n.endswith(".py")}
    assert "License-Expression: MIT" in metadata.splitlines()
    # Every module, and every subpackage a regular package (its __init__ says what is where).
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "gitract").rglob("*.py")}
    assert packed == sources
    for folder in (ROOT / "gitract").rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__":
            assert (folder / "__init__.py").is_file(), folder
