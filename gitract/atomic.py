"""Writing files so that a crash or a kill never leaves half of one behind.

Every output of the pipeline (checkpoints, CSVs, configs, caches, pictures) is written to a
temp file in the same folder and renamed over the target: readers see the old file or the new
one, never a torn one, and a failed write leaves no stray file. A write that runs out of disk
space is one :class:`~gitract.errors.DiskFullError` naming the file and the space left (a
Kaggle kernel's /kaggle/working and /kaggle/tmp have size limits).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gitract.errors import DiskFullError

__all__ = ["atomic_path", "disk_full", "out_of_space", "remove_stale_temps", "write_text_atomic"]

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# torch.save's zip writer reports a short write as "[enforce fail at inline_container.cc:...]
# ... unexpected pos N vs M", not as ENOSPC.
_TORCH_SHORT_WRITE = "unexpected pos"


def out_of_space(err: BaseException) -> bool:
    """Whether ``err`` is a write that ran out of disk space (or of the user's quota)."""
    if isinstance(err, OSError):
        return err.errno in _NO_SPACE
    return isinstance(err, RuntimeError) and _TORCH_SHORT_WRITE in str(err)


def disk_full(path: Path) -> DiskFullError:
    """The one-line error for ``path`` on a full disk, with the space left in its folder."""
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        f"{path}: no space left on the device ({free} in {path.parent}); free some space "
        "or write elsewhere"
    )


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
    except (OSError, RuntimeError) as err:
        if out_of_space(err):
            raise disk_full(path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def remove_stale_temps(folder: Path, prefix: str) -> None:
    """Delete the temp files of ``folder/<prefix>*`` left by writers that no longer run (a
    kill during a write leaves one as big as its target); a running writer's stays."""
    for tmp in folder.glob(f".{prefix}*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[0].rsplit(".", 1)[-1]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process is not writing it now: a leftover of an earlier failure
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
