"""Batches with one anisotropy level each, for SPAD-ViT's mixed 2D/3D training.

SPAD-ViT (SPAD-Nets, `arXiv:2312.07630 <https://arxiv.org/abs/2312.07630>`_) batches samples by ``aniso_d``: the
depth patch size ``16 >> aniso_d`` is a property of the whole batch, so every batch holds a single level.
:class:`AnisoBatchSampler` is a ``batch_sampler`` for ``torch.utils.data.DataLoader`` that does this and
shards the batches over distributed ranks the way ``DistributedSampler`` shards samples (a
:class:`~medfm.data.GroupBatchSampler` grouped by level). With a :class:`medfm.transforms.SpadScaleAugment` it
draws each sample's scale, and so its level, per epoch and hands the draw to the dataset with the index
(:class:`SpadDrawDataset`), as the reference's sampler does.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from medfm.transforms.spad_augment import SpadScaleAugment

from .group_sampler import GroupBatchSampler
from .seeded import SeededDataset

__all__ = ["AnisoBatchSampler", "SpadDrawDataset", "aniso_batch_sampler"]


class AnisoBatchSampler(GroupBatchSampler):
    """Yield lists of dataset indices in which every batch has a single ``aniso_d`` value: a
    :class:`~medfm.data.GroupBatchSampler` grouped by level (groups in ascending level when not shuffled).

    Args:
        aniso_d: the level of every dataset item, in dataset order.
        batch_size: samples per batch (the arguments after it are keywords).
        scale_augment: per-sample scale draws; each epoch every sample gets a draw from ``(seed, epoch)``, its
            level is the draw's ``aniso_d``, and batches hold ``(index, draw)`` pairs (for
            :class:`SpadDrawDataset`). The number of batches is then fixed at ``N // batch_size`` (``drop_last``)
            or ``ceil(N / batch_size)``, as the groups change from epoch to epoch: an epoch with fewer batches
            repeats its first ones, one with more drops its last ones.
        spacing: depth-first spacing of every item (needed with ``scale_augment``).
        shape: depth-first spatial shape of every item (needed with ``scale_augment``).
        **kw: further arguments of :class:`~medfm.data.GroupBatchSampler` (``shuffle``, ``drop_last``, ``seed``,
            ``num_replicas``, ``rank``, ``align_replicas``; ``seed_samples`` yields :class:`~medfm.data.SeededSample`
            items (index, per-sample seed, draw) for :class:`SpadDrawDataset`).
    """

    def __init__(
        self,
        aniso_d: Sequence[int],
        batch_size: int,
        *,
        scale_augment: SpadScaleAugment | None = None,
        spacing: Sequence[Sequence[float]] | None = None,
        shape: Sequence[Sequence[int]] | None = None,
        **kw: Any,
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
        super().__init__(levels, batch_size, **kw)
        self.scale_augment = scale_augment
        if scale_augment is not None:
            n = len(levels)
            if spacing is None or shape is None or len(spacing) != n or len(shape) != n:
                raise ValueError(f"scale_augment needs the spacing and shape of each of the {n} items.")
            self.spacing = [[float(v) for v in sp] for sp in spacing]
            self.shape = [[int(v) for v in sh] for sh in shape]
            # the levels change with every epoch's draws: the batch count is that of one group of all items
            self._set_batch_counts({"all items": n})

    def epoch_groups(self) -> dict[Hashable, list[Any]]:
        """Levels as stored, or with ``scale_augment`` the levels of this epoch's draws (``(index, draw)`` items)."""
        if self.scale_augment is None:
            return self.groups
        rng = np.random.default_rng((self.seed, self.epoch))
        groups: dict[Hashable, list[Any]] = {}
        for i, (sp, sh) in enumerate(zip(self.spacing, self.shape)):
            draw = self.scale_augment.draw(rng, sp, sh)
            groups.setdefault(draw["aniso_d"], []).append((i, draw))
        return groups


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
        batch_size: samples per batch (the arguments after it are keywords).
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


class SpadDrawDataset(SeededDataset):
    """A dataset whose items are ``dataset[i]`` followed by ``transform``, for batches of :class:`AnisoBatchSampler`.

    An index is an int, an ``(index, draw)`` pair (from an :class:`AnisoBatchSampler` with ``scale_augment``), or
    a :class:`~medfm.data.SeededSample` (from a sampler with ``seed_samples``: its seed fixes the random transforms);
    the draw is put into the item under ``draw_key`` before ``transform`` (e.g.
    :class:`medfm.transforms.SpadRandAffineCropd`) runs. ``dataset`` holds the deterministic (cached) part.

    Args:
        dataset: the base dataset (e.g. a ``PersistentDataset`` of the loading transforms).
        transform: the random transforms.
        draw_key: where the draw goes.
    """

    def __init__(self, dataset: Any, transform: Any, draw_key: str = "spad_draw") -> None:
        super().__init__(dataset, transform, draw_key)
