"""Errors that the command-line scripts turn into one clean line and a non-zero exit.

Anything a user can cause with a bad file, row, value or flag raises a subclass of
:class:`GitractError`; its message must name the culprit (file, row, key or value), because it
is all the user sees: the scripts print it without a traceback.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DiskFullError",
    "GitractError",
    "RLEError",
    "TrainingError",
]


class GitractError(Exception):
    """Base class of the errors that are the user's to fix, not the program's."""


class DataError(GitractError, ValueError):
    """The competition files (train.csv, images, folds.csv, sample_submission.csv) are wrong."""


class RLEError(GitractError, ValueError):
    """A run-length encoded mask is malformed."""


class ConfigError(GitractError, ValueError):
    """A YAML config or a ``--set`` override is invalid."""


class CheckpointError(GitractError, ValueError):
    """A checkpoint is missing, unsafe, or does not fit its config."""


class TrainingError(GitractError, RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the epoch and step."""


class DiskFullError(GitractError, OSError):
    """A write ran out of disk space; the message names the file and the space left."""
