"""Atomic writes: the target is replaced whole, or left as it was with no stray file."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from gitract.atomic import atomic_path, write_text_atomic
from gitract.errors import DiskFullError, GitractError


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


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EDQUOT, "Disk quota exceeded"),
        # What torch.save's zip writer raises on a short write.
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 165888 vs 165784"),
    ],
)
def test_a_full_disk_is_one_line_naming_the_file_and_the_space_left(tmp_path, failure) -> None:
    target = tmp_path / "best.pt"
    target.write_text("old")
    with pytest.raises(DiskFullError) as caught, atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise failure
    message = str(caught.value)
    assert message.startswith(f"{target}: no space left on the device (")
    assert re.search(rf"\d+\.\d MB free in {re.escape(str(tmp_path))}\)", message)
    assert "\n" not in message and isinstance(caught.value, GitractError)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_other_write_errors_stay_what_they_are(tmp_path) -> None:
    with pytest.raises(PermissionError), atomic_path(tmp_path / "x") as tmp:
        tmp.write_text("x")
        raise PermissionError(errno.EACCES, "Permission denied")


def test_checkpoint_and_submission_writers_report_a_full_disk(tmp_path, monkeypatch) -> None:
    """The writers a user meets first: torch.save of a checkpoint, the submission CSV."""
    import pandas as pd
    import torch

    from gitract.inference.submission import write_submission
    from gitract.models.checkpoint import save_checkpoint

    def short_write(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 0")

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(DiskFullError, match=r"best\.pt: no space left on the device"):
        save_checkpoint({"w": torch.zeros(3)}, tmp_path / "best.pt")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    sample = pd.DataFrame({"id": ["case1_day0_slice_0001"], "class": ["stomach"]})
    with pytest.raises(DiskFullError, match=r"submission\.csv: no space left on the device"):
        write_submission(
            sample, {("case1_day0_slice_0001", "stomach"): ""}, tmp_path / "submission.csv"
        )
    assert list(tmp_path.iterdir()) == []
