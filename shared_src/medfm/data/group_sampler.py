"""Batches drawn within groups of a dataset, sharded over distributed ranks.

Several methods need every batch to come from one group of samples: SPAD-ViT batches by anisotropy level
(``aniso_d``, :class:`medfm.data.AnisoBatchSampler`), and Pan-FM batches subjects of similar token counts so that a
padded batch costs what its tokens cost (:func:`medfm.data.token_bucket_sampler`). :class:`GroupBatchSampler` is the
``batch_sampler`` for ``torch.utils.data.DataLoader`` behind both; it shards the batches over ranks the way
``DistributedSampler`` shards samples.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from medfm.utils.dist import get_rank, get_world_size
from medfm.utils.seeding import derive_seed

from .seeded import SeededSample

__all__ = ["GroupBatchSampler", "length_buckets", "shuffle_batch_sampler"]


class GroupBatchSampler(Sampler[list[Any]]):
    """Yield lists of dataset indices in which every batch lies within one group.

    Per epoch: indices are grouped by key, each group is shuffled and cut into batches of ``batch_size`` (the
    last, smaller batch of a group is kept unless ``drop_last``), and the batches of all groups are shuffled
    together. The order depends only on ``seed + epoch`` (:meth:`set_epoch`), so every rank draws the same global
    list of batches; rank ``r`` of ``R`` takes batches ``r, r + R, ...``. When the number of batches does not
    divide by ``R``, the list is padded by repeating its first batches (every rank gets ``ceil(B / R)``), or with
    ``drop_last`` its tail is dropped (``floor(B / R)``), like ``DistributedSampler``.

    Exact resumption: :meth:`set_start` makes the next pass skip this rank's first batches of the epoch (those a
    resumed run already trained on), and with ``seed_samples`` every item is a :class:`~medfm.data.SeededSample`
    carrying a seed derived from ``(seed, epoch, index)`` for the random transforms of
    :class:`~medfm.data.SeededDataset`, so a sample's augmentation never depends on which process or worker loads it.

    With ``align_replicas`` (and ``shuffle``), the shuffle moves runs of ``R`` consecutive batches of one group, so
    the ``R`` ranks work on the same group at the same step (under DDP a step waits for its slowest rank); the
    batches left over when a group's batch count does not divide by ``R`` come last, in shuffled order.

    Args:
        groups: the group key of every dataset item, in dataset order (sortable keys, e.g. ints).
        batch_size: samples per batch.
        shuffle: shuffle within groups and the order of batches each epoch; ``False`` gives groups in ascending
            key order and indices in dataset order.
        drop_last: drop each group's incomplete last batch and the batches that do not divide over ranks.
        seed: base seed, shared by all ranks.
        num_replicas: number of ranks; default the ``torch.distributed`` world size when initialised, else 1.
        rank: this rank; default the ``torch.distributed`` rank when initialised, else 0.
        align_replicas: keep the ranks on the same group at each step (see above).
        seed_samples: yield :class:`~medfm.data.SeededSample` items instead of bare items.
    """

    def __init__(
        self,
        groups: Sequence[Hashable],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        align_replicas: bool = False,
        seed_samples: bool = False,
    ) -> None:
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if len(groups) == 0:
            raise ValueError("groups is empty: no samples to batch.")
        num_replicas = get_world_size() if num_replicas is None else num_replicas
        rank = get_rank() if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}.")
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.align_replicas = bool(align_replicas)
        self.seed_samples = bool(seed_samples)
        self.epoch = 0
        self.start = 0
        self.groups: dict[Hashable, list[int]] = {}
        for i, key in enumerate(groups):
            self.groups.setdefault(key, []).append(i)
        self._set_batch_counts({k: len(g) for k, g in sorted(self.groups.items())})

    def _set_batch_counts(self, group_sizes: dict[Hashable, int]) -> None:
        """``total_batches`` (all ranks) and ``num_batches`` (per rank) for groups of these sizes."""
        per_group = (n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
                     for n in group_sizes.values())  # fmt: skip
        self.total_batches = sum(per_group)
        if self.drop_last:
            self.num_batches = self.total_batches // self.num_replicas
        else:
            self.num_batches = math.ceil(self.total_batches / self.num_replicas)
        if self.num_batches == 0:
            raise ValueError(
                f"no batch for rank {self.rank}: {self.total_batches} full batches of {self.batch_size} from group "
                f"sizes {group_sizes} over {self.num_replicas} ranks with drop_last=True; use a smaller batch_size or "
                "drop_last=False."
            )

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (and start it at its first batch); the shuffle of an epoch depends only on ``seed + epoch``."""
        self.epoch = int(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip this rank's first ``start`` batches of the current epoch (a run resumed in the middle of an epoch).

        Raises:
            ValueError: ``start`` is negative or not below the number of batches per rank.
        """
        if isinstance(start, bool) or int(start) != start or not 0 <= start < self.num_batches:
            raise ValueError(f"start must be an integer in [0, {self.num_batches}), got {start!r}.")
        self.start = int(start)

    def epoch_groups(self) -> dict[Hashable, list[Any]]:
        """The groups of the current epoch: ``{key: items}`` (dataset indices; a subclass may return other items,
        e.g. ``(index, draw)`` pairs, and groups that change with the epoch)."""
        return self.groups

    def global_batches(self) -> list[list[Any]]:
        """All ranks' batches of the current epoch before sharding (padded or trimmed to divide by ranks)."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        groups = self.epoch_groups()
        per_group: list[list[list[Any]]] = []
        for key in sorted(groups):
            idx = groups[key]
            if self.shuffle:
                idx = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            chunks = [idx[start : start + self.batch_size] for start in range(0, len(idx), self.batch_size)]
            per_group.append([b for b in chunks if len(b) == self.batch_size or not self.drop_last])
        if not self.shuffle:
            batches = [b for group in per_group for b in group]
        elif not self.align_replicas:
            batches = [b for group in per_group for b in group]
            batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
        else:  # shuffle runs of R batches of one group; the leftovers of each group go last
            r = self.num_replicas
            runs = [group[i : i + r] for group in per_group for i in range(0, len(group) - r + 1, r)]
            rest = [b for group in per_group for b in group[len(group) - len(group) % r :]]
            runs = [runs[j] for j in torch.randperm(len(runs), generator=g).tolist()]
            rest = [rest[j] for j in torch.randperm(len(rest), generator=g).tolist()]
            batches = [b for run in runs for b in run] + rest
        total = self.num_batches * self.num_replicas
        if not batches:
            raise ValueError(f"no full batch of {self.batch_size} this epoch ({self.epoch}); use drop_last=False.")
        if total > len(batches):
            batches += (batches * math.ceil((total - len(batches)) / len(batches)))[: total - len(batches)]
        return batches[:total]

    def __iter__(self) -> Iterator[list[Any]]:
        batches = self.global_batches()[self.rank :: self.num_replicas][self.start :]
        if not self.seed_samples:
            yield from batches
            return
        for batch in batches:
            yield [self._seeded(item) for item in batch]

    def _seeded(self, item: Any) -> SeededSample:
        index, draw = (item[0], item[1]) if isinstance(item, tuple) else (item, None)
        return SeededSample(int(index), derive_seed(self.seed, self.epoch, int(index)), draw)

    def __len__(self) -> int:
        return self.num_batches


def shuffle_batch_sampler(num_items: int | Sized, batch_size: int, **kw: Any) -> GroupBatchSampler:
    """A :class:`GroupBatchSampler` with one group: the plain shuffled batches of ``DataLoader(shuffle=True)``,
    but with an order that depends only on ``(seed, epoch)``, resumable mid-epoch (:meth:`~GroupBatchSampler.set_start`)
    and sharded over ranks.

    Args:
        num_items: dataset length (an ``int``, or anything with ``len``).
        batch_size: samples per batch.
        **kw: further arguments of :class:`GroupBatchSampler` (``shuffle``, ``drop_last``, ``seed``,
            ``num_replicas``, ``rank``, ``seed_samples``).
    """
    n = num_items if isinstance(num_items, int) else len(num_items)
    return GroupBatchSampler([0] * n, batch_size, **kw)


def length_buckets(lengths: Sequence[int], num_buckets: int, batch_size: int) -> list[int]:
    """Equal-frequency buckets of sequence length, as group keys for :class:`GroupBatchSampler`.

    Items are ranked by length (ties by index) and cut into consecutive buckets of ``bucket_size =
    ceil(N / num_buckets / batch_size) * batch_size`` items, a multiple of the batch size, so only the longest
    bucket can end in an incomplete batch. Bucket 0 holds the shortest items; a batch drawn within a bucket is
    padded only up to the bucket's longest item. ``num_buckets=1`` is one group (plain shuffling).

    Args:
        lengths: length (e.g. token count) of every item, in dataset order.
        num_buckets: buckets wanted (fewer when the items fill fewer buckets of whole batches).
        batch_size: samples per batch.

    Returns:
        the bucket index of every item, in dataset order.
    """
    if isinstance(num_buckets, bool) or int(num_buckets) != num_buckets or num_buckets < 1:
        raise ValueError(f"num_buckets must be a positive integer, got {num_buckets!r}.")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if len(lengths) == 0:
        raise ValueError("lengths is empty: no samples to bucket.")
    bucket_size = math.ceil(len(lengths) / num_buckets / batch_size) * batch_size
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    buckets = [0] * len(lengths)
    for rank, i in enumerate(order):
        buckets[i] = rank // bucket_size
    return buckets
