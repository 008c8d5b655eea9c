"""Batches with one anisotropy level each, for SPAD-ViT's mixed 2D/3D training.

SPAD-ViT (SPAD-Nets, `arXiv:2312.07630 <https://arxiv.org/abs/2312.07630>`_) batches samples by ``aniso_d``: the
depth patch size ``16 >> aniso_d`` is a property of the whole batch, so every batch holds a single level.
:class:`AnisoBatchSampler` is a ``batch_sampler`` for ``torch.utils.data.DataLoader`` that does this and
shards the batches over distributed ranks the way ``DistributedSampler`` shards samples (a
:class:`~medfm.data.GroupBatchSampler` grouped by level).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .group_sampler import GroupBatchSampler

__all__ = ["AnisoBatchSampler", "aniso_batch_sampler"]


class AnisoBatchSampler(GroupBatchSampler):
    """Yield lists of dataset indices in which every batch has a single ``aniso_d`` value: a
    :class:`~medfm.data.GroupBatchSampler` grouped by level (groups in ascending level when not shuffled).

    Args:
        aniso_d: the level of every dataset item, in dataset order.
        batch_size, shuffle, drop_last, seed, num_replicas, rank: of :class:`~medfm.data.GroupBatchSampler`.
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
        super().__init__(levels, batch_size, shuffle, drop_last, seed, num_replicas, rank)


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
