"""Batches with one anisotropy level each, for SPAD-ViT's mixed 2D/3D training.

SPAD-ViT (SPAD-Nets, `arXiv:2312.07630 <https://arxiv.org/abs/2312.07630>`_) batches samples by ``aniso_d``: the
depth patch size ``16 >> aniso_d`` is a property of the whole batch, so every batch holds a single level.
:class:`AnisoBatchSampler` is a ``batch_sampler`` for ``torch.utils.data.DataLoader`` that does this and
shards the batches over distributed ranks the way ``DistributedSampler`` shards samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["AnisoBatchSampler", "aniso_batch_sampler"]


class AnisoBatchSampler(Sampler[list[int]]):
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
        batches: list[list[int]] = []
        for level in sorted(self.groups):
            idx = self.groups[level]
            if self.shuffle:
                idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        total = self.num_batches * self.num_replicas
        if total > len(batches):
            batches += (batches * math.ceil((total - len(batches)) / len(batches)))[: total - len(batches)]
        return batches[:total]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.global_batches()[self.rank :: self.num_replicas]

    def __len__(self) -> int:
        return self.num_batches


def aniso_batch_sampler(datalist: Sequence[Mapping[str, Any]], batch_size: int, **kw: Any) -> AnisoBatchSampler:
    """:class:`AnisoBatchSampler` from datalist dicts carrying ``"aniso_d"`` (one ``_target_`` in a bundle config).

    Args:
        datalist: items such as those of :func:`medfm.data.spad.build_spad_datalist`.
        batch_size: samples per batch.
        **kw: further arguments of :class:`AnisoBatchSampler`.
    """
    levels = []
    for i, item in enumerate(datalist):
        if not isinstance(item, Mapping) or item.get("aniso_d") is None:
            name = item.get("image", "?") if isinstance(item, Mapping) else repr(item)
            raise ValueError(f"datalist item {i} ({name}) has no 'aniso_d'; build it with build_spad_datalist.")
        levels.append(item["aniso_d"])
    return AnisoBatchSampler(levels, batch_size, **kw)
