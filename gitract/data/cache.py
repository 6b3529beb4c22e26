"""A per-case-day cache of slices as ``.npy`` volumes on disk, built once.

A 2.5D sample needs three (or more) slices of one case-day. Decoding three PNGs per sample is
what makes naive loaders slow, and holding every volume in RAM does not scale to the 38k real
slices. So each case-day is decoded once into ``<case_day>-<key>.npy`` (uint16, D x H x W), a
``.mask.npy`` beside it (uint8, one byte of class flags per pixel: bit c is class c) and a small
JSON with its intensity window; a sample memory-maps the files and copies out just its slices,
so memory stays flat whatever the data size. The key hashes the source files' paths, sizes and
modification times (and the RLE strings), so changed data gets a fresh entry, not a stale one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from gitract.atomic import atomic_path, remove_stale_temps, write_text_atomic
from gitract.data.layout import CLASSES, read_slice, slice_mask
from gitract.data.rle import rle_decode_many
from gitract.errors import DataError, RLEError

__all__ = ["VolumeCache", "VolumeInfo", "default_cache_dir", "unpack_mask"]

# Bit c of a packed mask byte is class c: row k of this table is byte k's (3,) 0/1 mask.
_UNPACK = (np.arange(8, dtype=np.uint8)[:, None] >> np.arange(3, dtype=np.uint8)) & 1
# Robust intensity window per case-day: the 16-bit MRI range differs between scanners and days.
PERCENTILES = (0.5, 99.5)
# Part of every entry's key: entries of an older layout (raw .u16 files) are simply not found.
_FORMAT = "npy-1"


def unpack_mask(packed: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) masks of 0/1 from packed class flags (bit c: class c): a table look-up,
    ~6x faster than bit shifts."""
    return np.take(_UNPACK, packed, axis=0)


def default_cache_dir() -> Path:
    """``$GITRACT_CACHE_DIR``, else ``$XDG_CACHE_HOME/gitract`` (``~/.cache/gitract``).

    In a Kaggle kernel the input folder is read-only, so the cache must live elsewhere."""
    if env := os.environ.get("GITRACT_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gitract"


@dataclass(frozen=True)
class VolumeInfo:
    """One cached case-day: its shape, intensity window (lo, hi) and files. An offset is where
    the array's bytes start in its ``.npy`` file, read from the file's header on opening."""

    case_day: str
    depth: int
    height: int
    width: int
    lo: float
    hi: float
    image_file: str
    image_offset: int
    mask_file: str | None
    mask_offset: int

    def plane(self, z: int, mask: bool = False) -> np.ndarray:
        """Slice ``z`` as stored: (H, W) uint16 intensities, or with ``mask`` the uint8 class
        flags. One positioned read: per sample several times faster than mapping the file anew,
        and nothing stays mapped (a map kept open would count every page a DataLoader worker
        ever read in its resident memory)."""
        path, offset, dtype = (
            (self.mask_file, self.mask_offset, np.uint8)
            if mask
            else (self.image_file, self.image_offset, np.uint16)
        )
        count = self.height * self.width
        at = offset + z * count * np.dtype(dtype).itemsize
        return np.fromfile(path, dtype, count, offset=at).reshape(self.height, self.width)


def _cache_key(group: pd.DataFrame, with_masks: bool) -> str:
    digest = hashlib.sha1(_FORMAT.encode())
    for path in group["path"]:
        stat = os.stat(path)
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    if with_masks:
        for cls in CLASSES:
            digest.update("\n".join(group[cls]).encode())
    return digest.hexdigest()[:16]


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)  # a file object: np.save would append ".npy" to a temp name


class _Damaged(Exception):
    """A cache entry that cannot be used as it is; the message says why."""


_META_KEYS = {"depth", "height", "width", "lo", "hi", "masks"}


def _array_offset(path: Path, shape: tuple[int, ...], dtype: type) -> int:
    """Where ``path``'s array bytes start, after checking its header and its size on disk."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as err:  # missing, cut short, no header
        raise _Damaged(f"{path.name} unreadable ({str(err).splitlines()[0]})") from None
    if array.shape != shape or array.dtype != dtype:
        raise _Damaged(f"{path.name} holds {array.dtype} {array.shape}, not {shape}")
    size, expected = path.stat().st_size, array.offset + array.nbytes
    if size != expected:
        raise _Damaged(f"{path.name} is {size} bytes, not {expected}")
    return int(array.offset)


def _open_entry(case_day: str, stem: Path, depth: int) -> VolumeInfo:
    """Check a built entry (readable JSON, a finite intensity window, arrays whose header and
    size fit it) and return it; :class:`_Damaged` says what is wrong."""
    try:
        meta = json.loads(stem.with_suffix(".json").read_text())
    except (OSError, ValueError) as err:
        raise _Damaged(f"metadata unreadable ({str(err).splitlines()[0] or 'empty'})") from None
    if not isinstance(meta, dict) or set(meta) != _META_KEYS:
        raise _Damaged(f"metadata keys {sorted(meta) if isinstance(meta, dict) else meta!r}")
    lo, hi = meta["lo"], meta["hi"]
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in (lo, hi)) or hi <= lo:
        raise _Damaged(f"intensity window ({lo}, {hi}) is not finite and increasing")
    if meta["depth"] != depth:
        raise _Damaged(f"{meta['depth']} slices, the data has {depth}")
    shape = (meta["depth"], meta["height"], meta["width"])
    # Paths are derived, so a cache folder that was moved or mounted elsewhere works.
    image_file, mask_file = stem.with_suffix(".npy"), stem.with_suffix(".mask.npy")
    return VolumeInfo(
        case_day=case_day,
        depth=shape[0],
        height=shape[1],
        width=shape[2],
        lo=float(lo),
        hi=float(hi),
        image_file=str(image_file),
        image_offset=_array_offset(image_file, shape, np.uint16),
        mask_file=str(mask_file) if meta["masks"] else None,
        mask_offset=_array_offset(mask_file, shape, np.uint8) if meta["masks"] else 0,
    )


class VolumeCache:
    """Slices and masks of the case-days in ``table``, read from an on-disk cache.

    ``table`` is a slice table (``gitract.data.layout.load_train_table`` or ``scan_images``); with
    ``with_masks`` it must carry the RLE columns. Missing cache entries are built on creation.
    The object pickles cheaply (metadata only), so DataLoader workers can share it.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        cache_dir: str | Path | None = None,
        with_masks: bool = True,
        progress: bool = True,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.with_masks = with_masks
        self.volumes: dict[str, VolumeInfo] = {}
        # id -> (case_day, z): z is the position in the case-day's slice order, not the number.
        self.position: dict[str, tuple[str, int]] = {}
        groups = list(table.sort_values(["case_day", "slice"]).groupby("case_day", sort=True))
        bar = tqdm(groups, desc="volume cache", unit="vol", disable=not progress, leave=False)
        for case_day, group in bar:
            self.volumes[case_day] = self._load_or_build(case_day, group)
            for z, slice_id in enumerate(group["id"]):
                self.position[slice_id] = (case_day, z)

    def _load_or_build(self, case_day: str, group: pd.DataFrame) -> VolumeInfo:
        """The case-day's entry, checked as it is opened; built when missing, rebuilt (with a
        one-line note) when damaged: a file cut short by a full disk or a half-copied cache
        folder must not break every later run."""
        stem = self.cache_dir / f"{case_day}-{_cache_key(group, self.with_masks)}"
        if stem.with_suffix(".json").exists():
            try:
                return _open_entry(case_day, stem, len(group))
            except _Damaged as why:
                print(f"note: volume cache entry {stem}.*: {why}; rebuilding it", file=sys.stderr)
        self._build(case_day, group, stem)
        try:
            return _open_entry(case_day, stem, len(group))
        except _Damaged as why:
            raise DataError(
                f"volume cache entry {stem}.*: {why}, even rebuilt from the PNGs; delete those "
                f"files (or the cache folder {self.cache_dir}) and check the disk"
            ) from None

    def _build(self, case_day: str, group: pd.DataFrame, stem: Path) -> None:
        """Decode the case-day's PNGs and RLEs once into ``stem``'s .npy files and JSON."""
        remove_stale_temps(self.cache_dir, stem.name)
        shapes = set(zip(group["height"], group["width"], strict=True))
        if len(shapes) != 1:
            raise DataError(f"{case_day}: slices of different sizes {sorted(shapes)}")
        height, width = shapes.pop()
        rows = group.to_dict("records")
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            # cv2 releases the GIL while decoding, so threads do overlap here.
            images = list(pool.map(lambda r: read_slice(r["path"], (height, width)), rows))
        volume = np.stack(images)
        # Decode the masks before writing anything: a bad RLE must not leave half an entry.
        packed = None
        if self.with_masks:
            packed = np.zeros((len(rows), height, width), dtype=np.uint8)
            for bit, name in enumerate(CLASSES):
                try:
                    packed |= rle_decode_many(group[name].tolist(), (height, width)) << bit
                except RLEError:
                    for row in rows:  # slice by slice, to name the id and class at fault
                        slice_mask(row)
                    raise
        lo, hi = np.percentile(volume[:, ::2, ::2], PERCENTILES)
        _save(stem.with_suffix(".npy"), volume.astype(np.uint16))
        if packed is not None:
            _save(stem.with_suffix(".mask.npy"), packed)
        meta = {
            "depth": len(rows),
            "height": int(height),
            "width": int(width),
            "lo": float(lo),
            "hi": float(max(hi, lo + 1.0)),
            "masks": packed is not None,
        }
        # The JSON goes last: its presence is what marks the entry complete.
        write_text_atomic(stem.with_suffix(".json"), json.dumps(meta))

    def locate(self, slice_id: str) -> tuple[VolumeInfo, int]:
        """The volume holding ``slice_id`` and the slice's position in it."""
        case_day, z = self.position[slice_id]
        return self.volumes[case_day], z

    def image_stack(self, slice_id: str, offsets: Sequence[int]) -> np.ndarray:
        """Normalised float32 (H, W, len(offsets)) of the slices at ``z + offset``, clamped to
        the volume's ends (so the first slice's neighbour below is itself)."""
        info, z = self.locate(slice_id)
        zs = np.clip(np.asarray(offsets) + z, 0, info.depth - 1)
        stack = np.stack([info.plane(int(k)) for k in zs], axis=-1).astype(np.float32)
        scaled = (stack - info.lo) / (info.hi - info.lo)
        return np.clip(scaled, 0.0, 1.0, out=scaled)

    def mask(self, slice_id: str) -> np.ndarray:
        """The slice's (H, W, 3) uint8 mask of 0/1, in CLASSES order."""
        info, z = self.locate(slice_id)
        if info.mask_file is None:
            raise ValueError("this cache was built without masks")
        return unpack_mask(info.plane(z, mask=True))
