"""A damaged volume-cache entry is found when it is opened and rebuilt from the PNGs, with a
one-line note naming it; what a killed build left behind is swept away."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gitract.data import cache as cache_module
from gitract.data.cache import VolumeCache
from gitract.data.layout import load_train_table
from gitract.errors import DataError


@pytest.fixture
def built(make_tiny_kaggle, tmp_path):
    kaggle = make_tiny_kaggle("integrity", layout=[(1, 0, 4, 48, 40), (2, 0, 3, 44, 44)])
    table = load_train_table(kaggle.root)
    folder = tmp_path / "cache"
    return table, folder, VolumeCache(table, folder, progress=False)


def _entry(folder, case_day: str, suffix: str):
    (path,) = [
        p for p in folder.glob(f"{case_day}-*{suffix}") if p.name.count(".") == suffix.count(".")
    ]
    return path


def _cut_in_half(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path) -> None:
    path.write_text("")


def _nan_window(path) -> None:
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "lo": float("nan")}))


@pytest.mark.parametrize(
    ("suffix", "damage", "why"),
    [
        (".npy", _cut_in_half, "unreadable"),  # was: mmap length is greater than file size
        (".mask.npy", _cut_in_half, "unreadable"),  # was: EOF: reading array header
        (".json", _empty, "metadata unreadable"),  # was: JSONDecodeError
        (".json", _nan_window, "intensity window (nan, "),  # its inputs would be NaN
    ],
)
def test_a_damaged_entry_is_rebuilt_with_a_note(built, capsys, suffix, damage, why) -> None:
    table, folder, cache = built
    slice_id = table["id"].iloc[1]
    image, mask = cache.image_stack(slice_id, [0, 1]), cache.mask(slice_id)
    damage(_entry(folder, "case1_day0", suffix))
    capsys.readouterr()

    again = VolumeCache(table, folder, progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"note: volume cache entry {folder}")
    assert "case1_day0-" in err[0] and why in err[0] and err[0].endswith("rebuilding it")
    assert np.array_equal(again.image_stack(slice_id, [0, 1]), image)
    assert np.array_equal(again.mask(slice_id), mask)
    VolumeCache(table, folder, progress=False)  # repaired: no note the next time
    assert capsys.readouterr().err == ""


def test_an_entry_that_stays_damaged_is_one_line_saying_how_to_clear_it(built, monkeypatch) -> None:
    table, folder, _ = built
    _cut_in_half(_entry(folder, "case2_day0", ".npy"))
    real = cache_module._open_entry

    def always_short(case_day, stem, depth):
        if case_day == "case2_day0":
            raise cache_module._Damaged("case2_day0.npy unreadable (disk error)")
        return real(case_day, stem, depth)

    monkeypatch.setattr(cache_module, "_open_entry", always_short)
    with pytest.raises(DataError) as caught:
        VolumeCache(table, folder, progress=False)
    message = str(caught.value)
    assert message.startswith(f"volume cache entry {folder}/case2_day0-")
    assert "even rebuilt from the PNGs; delete those files" in message and "\n" not in message


def test_a_killed_builds_temp_files_go_when_the_entry_is_built_again(built) -> None:
    table, folder, _ = built
    image = _entry(folder, "case1_day0", ".npy")
    stale = folder / f".{image.name}.4194000.tmp"  # no such process
    live = folder / f".{image.name}.{os.getppid()}.tmp"  # a writer that still runs
    stale.write_bytes(b"half a volume")
    live.write_bytes(b"being written")
    _entry(folder, "case1_day0", ".json").unlink()  # the entry is built again
    VolumeCache(table, folder, progress=False)
    assert not stale.exists() and live.exists()
