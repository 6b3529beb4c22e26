"""Writing files so that a crash or a kill never leaves half of one behind.

Every output of the pipeline (checkpoints, CSVs, configs, caches, pictures) is written to a
temp file in the same folder and renamed over the target: readers see the old file or the new
one, never a torn one, and a failed write leaves no stray file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "write_text_atomic"]


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path`` (``.<name>.<pid>.tmp<suffix>``) to write to.

    On leaving the block it replaces ``path`` in one rename; on an error it is removed and
    ``path`` is untouched. ``suffix`` is for writers that pick the format from the extension
    (matplotlib)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)
