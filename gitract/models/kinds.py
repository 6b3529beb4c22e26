"""The registry of model kinds: ``model.kind`` -> its :class:`~gitract.models.kind.ModelKind`.

A new kind is one module implementing the interface and one line here."""

from __future__ import annotations

from gitract.config import Config
from gitract.models.kind import ModelKind
from gitract.models.kind2d import KIND_2D
from gitract.models.kind3d import KIND_3D

__all__ = ["KINDS", "kind_of"]

KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (KIND_2D, KIND_3D)}


def kind_of(cfg: Config) -> ModelKind:
    """The kind of ``cfg.model.kind`` (the config only admits registered names)."""
    return KINDS[cfg.model.kind]
