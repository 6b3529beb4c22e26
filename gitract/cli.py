"""Shared entry-point plumbing for ``scripts/``: one-line errors and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable

from gitract.errors import GitractError

__all__ = ["run_main"]


def run_main(main: Callable[[], int | None]) -> None:
    """Run a script's ``main`` and exit with its status.

    A :class:`GitractError` (bad input the user can fix) is printed as ``error: <message>`` on
    one line with exit code 2 and no traceback; anything else is a bug and keeps its traceback.
    """
    try:
        status = main()
    except GitractError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(status or 0)
