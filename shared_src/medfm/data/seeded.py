"""Samples whose random augmentation is fixed by a seed that travels with the index.

A resumed run must augment every sample as the uninterrupted run did. The random state of a transform
object is per process (and per data-loader worker), so it depends on how many samples that process has
already drawn; instead, the batch sampler (:class:`~medfm.data.GroupBatchSampler` with ``seed_samples``) hands
each index over with a seed derived from ``(seed, epoch, index)``, and :class:`SeededDataset` seeds the random
transforms with it just before they run. The result does not depend on the worker, the number of workers, or
what came before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.transforms import Randomizable, apply_transform
from torch.utils.data import Dataset

__all__ = ["SeededDataset", "SeededSample", "seeded_random_state"]

_MAX_NP_SEED = 2**32


class SeededSample(NamedTuple):
    """A dataset index with the seed of its random transforms and an optional per-sample draw.

    index: position in the dataset.
    seed: non-negative seed of the random transforms applied to this sample.
    draw: extra per-sample draw a transform reads (e.g. SPAD-ViT's scale draw), or None.
    """

    index: int
    seed: int
    draw: Any = None


@contextlib.contextmanager
def seeded_random_state(seed: int, transform: Any = None) -> Iterator[None]:
    """Seed ``transform`` (if Randomizable: MONAI's ``Compose`` reseeds each of its random transforms from it) and,
    for transforms that draw from the global generators, the torch (CPU) and NumPy global generators; the global
    states are restored on exit, so the caller's random streams are untouched."""
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % _MAX_NP_SEED)
        if isinstance(transform, Randomizable):
            transform.set_random_state(seed=seed % _MAX_NP_SEED)
        try:
            yield
        finally:
            np.random.set_state(np_state)


class SeededDataset(Dataset):
    """Items of ``dataset`` whose random transforms are seeded per sample by :class:`SeededSample` indices.

    With ``transform`` None, the random transforms are those of ``dataset.transform`` (a MONAI ``Dataset``,
    ``PersistentDataset`` or ``CacheDataset``, whose cached part is deterministic); otherwise ``dataset`` gives
    the deterministic item and ``transform`` runs on it, after the sample's draw (if any) is put under
    ``draw_key``. A plain ``int`` index runs the transforms unseeded.

    Args:
        dataset: the base dataset.
        transform: the random transforms, or None to use ``dataset.transform``.
        draw_key: where a :class:`SeededSample`'s draw goes (only with ``transform``).
    """

    def __init__(self, dataset: Any, transform: Any = None, draw_key: str = "draw") -> None:
        if transform is None and not hasattr(dataset, "transform"):
            raise ValueError(f"{type(dataset).__name__} has no transform attribute: pass the random transforms.")
        self.dataset = dataset
        self.transform = transform
        self.draw_key = draw_key

    def __len__(self) -> int:
        return len(self.dataset)

    def _load(self, index: int, draw: Any) -> Any:
        if self.transform is None:
            return self.dataset[index]
        data = dict(self.dataset[index])
        if draw is not None:
            data[self.draw_key] = draw
        return apply_transform(self.transform, data)

    def __getitem__(self, item: Any) -> Any:
        if isinstance(item, SeededSample):
            randomized = self.transform if self.transform is not None else self.dataset.transform
            with seeded_random_state(int(item.seed), randomized):
                return self._load(int(item.index), item.draw)
        if isinstance(item, (tuple, list)):
            return self._load(int(item[0]), item[1])
        return self._load(int(item), None)
