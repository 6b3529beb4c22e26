"""Training items drawn with their own seeds, so that a resumed run draws what an
uninterrupted one would.

A dataset's augmentation stream used to be seeded once per run (and per DataLoader worker):
a run killed after epoch N and resumed started epoch N + 1 from that first seed again, not from
where the stream had got to, and its weights drifted from the uninterrupted run's. Here the
sampler hands each item a seed derived from (train.seed, rank, epoch, position in the epoch),
and the dataset reseeds its augmentations with it before drawing: what an item looks like is a
function of where it stands, whatever the number of workers and whatever came before.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Dataset, DistributedSampler, Sampler

__all__ = ["SeededItems", "SeededSampler"]


class SeededSampler(Sampler[tuple[int, int]]):
    """``DistributedSampler``'s shuffle of ``dataset`` for this rank, as ``(index, seed)``."""

    def __init__(self, dataset: Dataset, seed: int, rank: int, world_size: int) -> None:
        self.inner = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
        self.seed, self.rank, self.epoch = seed, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for position, index in enumerate(self.inner):
            words = [self.seed, self.rank, self.epoch, position]
            yield index, int(np.random.SeedSequence(words).generate_state(1)[0])


class SeededItems(Dataset):
    """``dataset`` read with :class:`SeededSampler`'s keys: its ``transform`` is reseeded
    with the item's seed, then the item is drawn."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        transform = self.dataset.transform
        if hasattr(transform, "set_random_state"):
            # albumentations: one stream shared by all its transforms. Its set_random_seed
            # would give each transform its own generator of the same seed, whose first draws
            # are equal: every "apply with p" decision of an item would be the same one.
            transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        else:
            transform.set_random_seed(seed)
        return self.dataset[index]
