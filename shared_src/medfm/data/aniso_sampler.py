"""Batches with one anisotropy level each, for SPAD-ViT's mixed 2D/3D training.

SPAD-ViT (SPAD-Nets, `arXiv:2312.07630 <https://arxiv.org/abs/2312.07630>`_) batches samples by ``aniso_d``: the
depth patch size ``16 >> aniso_d`` is a property of the whole batch, so every batch holds a single level.
:class:`AnisoBatchSampler` is a ``batch_sampler`` for ``torch.utils.data.DataLoader`` that does this and
shards the batches over distributed ranks the way ``DistributedSampler`` shards samples. With a
:class:`medfm.transforms.SpadScaleAugment` it draws each sample's scale, and so its level, per epoch and hands the
draw to the dataset with the index (:class:`SpadDrawDataset`), as the reference's sampler does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.transforms import apply_transform
from torch.utils.data import Dataset, Sampler

from medfm.transforms.spad_augment import SpadScaleAugment

__all__ = ["AnisoBatchSampler", "SpadDrawDataset", "aniso_batch_sampler"]


class AnisoBatchSampler(Sampler[list[Any]]):
    """Yield lists of dataset indices in which every batch has a single ``aniso_d`` value.

    Per epoch: indices are grouped by level, each group is shuffled and cut into batches of ``batch_size``
    (the last, smaller batch of a group is kept unless ``drop_last``), and the batches of all groups are
    shuffled together. The order depends only on ``seed + epoch`` (:meth:`set_epoch`), so every rank draws the
    same global list of batches; rank ``r`` of ``R`` takes batches ``r, r + R, ...``. When the number of
    batches does not divide by ``R``, the list is padded by repeating its first batches (every rank gets
    ``ceil(B / R)``), or with ``drop_last`` its tail is dropped (``floor(B / R)``), like ``DistributedSampler``.

    Args:
        aniso_d: the level of every dataset item, in dataset order.
        batch_size: samples per batch.
        shuffle: shuffle within groups and the order of batches each epoch; ``False`` gives groups in ascending
            level and indices in dataset order.
        drop_last: drop each group's incomplete last batch and the batches that do not divide over ranks.
        seed: base seed, shared by all ranks.
        num_replicas: number of ranks; default the ``torch.distributed`` world size when initialised, else 1.
        rank: this rank; default the ``torch.distributed`` rank when initialised, else 0.
        scale_augment: per-sample scale draws; each epoch every sample gets a draw from ``(seed, epoch)``, its
            level is the draw's ``aniso_d``, and batches hold ``(index, draw)`` pairs (for
            :class:`SpadDrawDataset`). The number of batches is then fixed at ``N // batch_size`` (``drop_last``)
            or ``ceil(N / batch_size)``, as the groups change from epoch to epoch: an epoch with fewer batches
            repeats its first ones, one with more drops its last ones.
        spacing: depth-first spacing of every item (needed with ``scale_augment``).
        shape: depth-first spatial shape of every item (needed with ``scale_augment``).
    """

    def __init__(
        self,
        aniso_d: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        scale_augment: SpadScaleAugment | None = None,
        spacing: Sequence[Sequence[float]] | None = None,
        shape: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        levels = []
        for i, a in enumerate(aniso_d):
            try:
                ok = not isinstance(a, bool) and float(a).is_integer()
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"aniso_d must hold integers, got {a!r} at index {i}.")
            levels.append(int(a))
        if not levels:
            raise ValueError("aniso_d is empty: no samples to batch.")
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}.")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        self.groups: dict[int, list[int]] = {}
        for i, a in enumerate(levels):
            self.groups.setdefault(a, []).append(i)
        per_group = (len(g) // self.batch_size if self.drop_last else math.ceil(len(g) / self.batch_size)
                     for g in self.groups.values())  # fmt: skip
        self.total_batches = sum(per_group)
        self.scale_augment = scale_augment
        if scale_augment is not None:
            n = len(levels)
            if spacing is None or shape is None or len(spacing) != n or len(shape) != n:
                raise ValueError(f"scale_augment needs the spacing and shape of each of the {n} items.")
            self.spacing = [[float(v) for v in sp] for sp in spacing]
            self.shape = [[int(v) for v in sh] for sh in shape]
            self.total_batches = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        if self.drop_last:
            self.num_batches = self.total_batches // self.num_replicas
        else:
            self.num_batches = math.ceil(self.total_batches / self.num_replicas)
        if self.num_batches == 0:
            sizes = {a: len(g) for a, g in sorted(self.groups.items())}
            raise ValueError(
                f"no batch for rank {self.rank}: {self.total_batches} full batches of {self.batch_size} from group "
                f"sizes {sizes} over {self.num_replicas} ranks with drop_last=True; use a smaller batch_size or "
                "drop_last=False."
            )

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch; the shuffle of an epoch depends only on ``seed + epoch``."""
        self.epoch = int(epoch)

    def global_batches(self) -> list[list[int]]:
        """All ranks' batches of the current epoch before sharding (padded or trimmed to divide by ranks)."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        groups: dict[int, list[Any]] = self.groups
        if self.scale_augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch))
            groups = {}
            for i, (sp, sh) in enumerate(zip(self.spacing, self.shape)):
                draw = self.scale_augment.draw(rng, sp, sh)
                groups.setdefault(draw["aniso_d"], []).append((i, draw))
        batches: list[list[Any]] = []
        for level in sorted(groups):
            idx = groups[level]
            if self.shuffle:
                idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        total = self.num_batches * self.num_replicas
        if not batches:
            raise ValueError(f"no full batch of {self.batch_size} this epoch ({self.epoch}); use drop_last=False.")
        if total > len(batches):
            batches += (batches * math.ceil((total - len(batches)) / len(batches)))[: total - len(batches)]
        return batches[:total]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.global_batches()[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return self.num_batches


def aniso_batch_sampler(
    datalist: Sequence[Mapping[str, Any]],
    batch_size: int,
    scale_augment: SpadScaleAugment | None = None,
    **kw: Any,
) -> AnisoBatchSampler:
    """:class:`AnisoBatchSampler` from datalist dicts carrying ``"aniso_d"`` (one ``_target_`` in a bundle config).

    Args:
        datalist: items such as those of :func:`medfm.data.spad.build_spad_datalist` (with ``scale_augment``
            they also need ``"spacing"`` and ``"shape"``).
        batch_size: samples per batch.
        scale_augment: per-sample scale draws (see :class:`AnisoBatchSampler`); ``None`` keeps each level.
        **kw: further arguments of :class:`AnisoBatchSampler`.
    """
    levels = []
    for i, item in enumerate(datalist):
        if not isinstance(item, Mapping) or item.get("aniso_d") is None:
            name = item.get("image", "?") if isinstance(item, Mapping) else repr(item)
            raise ValueError(f"datalist item {i} ({name}) has no 'aniso_d'; build it with build_spad_datalist.")
        levels.append(item["aniso_d"])
    if scale_augment is not None:
        for i, item in enumerate(datalist):
            if item.get("spacing") is None or item.get("shape") is None:
                raise ValueError(
                    f"datalist item {i} ({item.get('image', '?')}) has no 'spacing' or 'shape', needed by the scale "
                    "augmentation; build it with build_spad_datalist."
                )
        kw.update(spacing=[d["spacing"] for d in datalist], shape=[d["shape"] for d in datalist])
    return AnisoBatchSampler(levels, batch_size, scale_augment=scale_augment, **kw)


class SpadDrawDataset(Dataset):
    """A dataset whose items are ``dataset[i]`` followed by ``transform``, for batches of :class:`AnisoBatchSampler`.

    An index is an int or an ``(index, draw)`` pair (from an :class:`AnisoBatchSampler` with ``scale_augment``);
    the draw is put into the item under ``draw_key`` before ``transform`` (e.g.
    :class:`medfm.transforms.SpadRandAffineCropd`) runs. ``dataset`` holds the deterministic (cached) part.

    Args:
        dataset: the base dataset (e.g. a ``PersistentDataset`` of the loading transforms).
        transform: the random transforms.
        draw_key: where the draw goes.
    """

    def __init__(self, dataset: Any, transform: Any, draw_key: str = "spad_draw") -> None:
        self.dataset = dataset
        self.transform = transform
        self.draw_key = draw_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Any) -> Any:
        index, draw = item if isinstance(item, (tuple, list)) else (item, None)
        data = dict(self.dataset[int(index)])
        if draw is not None:
            data[self.draw_key] = draw
        return apply_transform(self.transform, data)
