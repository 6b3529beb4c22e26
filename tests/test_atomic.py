"""Atomic writes: the target is replaced whole, or left as it was with no stray file."""

from __future__ import annotations

from pathlib import Path

import pytest

from gitract.atomic import atomic_path, write_text_atomic


def test_success_replaces_the_target_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.csv"  # the folder is made on the way
    write_text_atomic(target, "a,b\n1,2\n")
    write_text_atomic(target, "a,b\n3,4\n")
    assert target.read_text() == "a,b\n3,4\n"
    assert [p.name for p in target.parent.iterdir()] == ["out.csv"]


def test_failure_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_suffix_keeps_the_extension_for_format_sniffing_writers(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "curves.png", suffix=".png") as tmp:
        assert tmp.name.startswith(".curves.png.") and tmp.suffix == ".png"
        tmp.write_bytes(b"png")
    assert (tmp_path / "curves.png").read_bytes() == b"png"
