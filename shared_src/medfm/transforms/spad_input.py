"""SPAD-ViT pre-training input conventions of the authors' release: in-plane size limit and foreground crop.

The release (PUMIT, the code of SPAD-Nets, `arXiv:2312.07630 <https://arxiv.org/abs/2312.07630>`_) preprocesses
every image before pre-training: it crops the foreground and resizes so that the shorter in-plane side is at most
512 (anti-aliased). :class:`LimitInPlaneSized` and :class:`CropForegroundSpadd` do the same on ``(C, D, H, W)``
images after :class:`medfm.transforms.ReorientToDepthd`. The size limit changes the in-plane spacing and so
possibly ``aniso_d``; :func:`spad_limit_in_plane` is the rule both the transform and
:func:`medfm.data.build_spad_datalist` (``max_in_plane``) apply, so the batch sampler sees the level the network
gets. The limit is decided on the whole image (before the foreground crop), which the datalist can read from the
header.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Resize, SpatialCrop

from medfm.networks.blocks.spad import MAX_ANISO_D, aniso_d_from_spacing

from .spad import _name

__all__ = ["CropForegroundSpadd", "LimitInPlaneSized", "positive_in_all_channels", "spad_limit_in_plane"]


def spad_limit_in_plane(
    shape: Sequence[int], spacing: Sequence[float], max_size: int | None = 512
) -> tuple[list[int], list[float], int]:
    """Depth-first ``shape``, ``spacing`` and ``aniso_d`` after limiting the shorter in-plane side to ``max_size``.

    With ``r = max_size / min(H, W) < 1`` the in-plane sizes become ``round(H r)``, ``round(W r)`` and their
    spacings grow by ``H / round(H r)`` and ``W / round(W r)``; depth is kept. A 2D image (depth 1) keeps level
    ``MAX_ANISO_D`` and its nominal depth spacing ``2**MAX_ANISO_D * min(s_h, s_w)``. ``max_size=None`` changes
    nothing.

    >>> spad_limit_in_plane((10, 1024, 2048), (2.0, 0.5, 0.5))
    ([10, 512, 1024], [2.0, 1.0, 1.0], 1)
    """
    d, h, w = (int(n) for n in shape)
    s_d, s_h, s_w = (float(s) for s in spacing)
    if max_size is not None:
        if int(max_size) < 1:
            raise ValueError(f"max_size must be positive, got {max_size}.")
        r = int(max_size) / min(h, w)
        if r < 1:
            h2, w2 = max(round(h * r), 1), max(round(w * r), 1)
            s_h, s_w, h, w = s_h * h / h2, s_w * w / w2, h2, w2
    if d == 1:
        return [d, h, w], [float(1 << MAX_ANISO_D) * min(s_h, s_w), s_h, s_w], MAX_ANISO_D
    return [d, h, w], [s_d, s_h, s_w], aniso_d_from_spacing((s_d, s_h, s_w))


class LimitInPlaneSized(MapTransform):
    """Resize ``(C, D, H, W)`` images so that the shorter in-plane side is at most ``max_size`` (anti-aliased).

    Depth is kept. Uses MONAI ``Resize`` (``mode``, Gaussian anti-aliasing when shrinking); every key gets the
    first key's new size. Updates ``data[spacing_key]`` and ``data[aniso_key]`` by :func:`spad_limit_in_plane`.

    Args:
        keys: keys to resize (images; use ``mode="nearest"`` in a second instance for labels).
        max_size: the largest shorter in-plane side (the release's: 512); ``None`` leaves images as they are.
        mode: interpolation of ``Resize`` (the release's: ``"area"``).
        spacing_key: key of the depth-first spacing (from :class:`medfm.transforms.ReorientToDepthd`).
        aniso_key: key of the anisotropy level.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        max_size: int | None = 512,
        mode: str = "area",
        spacing_key: str = "spacing",
        aniso_key: str = "aniso_d",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if max_size is not None and int(max_size) < 1:
            raise ValueError(f"max_size must be positive, got {max_size}.")
        self.max_size = None if max_size is None else int(max_size)
        self.mode = mode
        self.spacing_key, self.aniso_key = spacing_key, aniso_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys or self.max_size is None:
            return d
        ref = d[keys[0]]
        if ref.ndim != 4:
            raise ValueError(
                f"{_name(ref)}: expected (C, D, H, W) (run ReorientToDepthd first), got {tuple(ref.shape)}."
            )
        if self.spacing_key not in d:
            raise ValueError(f"{_name(ref)}: no {self.spacing_key!r} in the data (run ReorientToDepthd first).")
        shape, spacing, level = spad_limit_in_plane(ref.shape[1:], d[self.spacing_key], self.max_size)
        if shape == [int(n) for n in ref.shape[1:]]:
            return d
        resize = Resize((-1, shape[1], shape[2]), mode=self.mode, anti_aliasing=True)
        for key in keys:
            d[key] = resize(d[key])
        d[self.spacing_key], d[self.aniso_key] = spacing, level
        return d


def positive_in_all_channels(img: torch.Tensor) -> torch.Tensor:
    """``(1, ...)`` mask of the voxels above 0 in every channel (the release's foreground after scaling)."""
    return (torch.as_tensor(img) > 0).all(dim=0, keepdim=True)


class CropForegroundSpadd(MapTransform):
    """Crop every key to the bounding box of the foreground of ``source_key``: voxels above 0 in every channel.

    Run after :class:`medfm.transforms.ScaleIntensitySpadd`: a voxel above 0 there is above the 0.5 percentile of
    the voxels above the image's minimum (scans), or above 0 (8-bit natural images), which is the foreground the
    release crops to. An image without foreground is left whole. The affine follows (MONAI ``SpatialCrop``).

    Args:
        keys: keys to crop; they share the source's spatial shape.
        source_key: the image whose foreground sets the box.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(self, keys: KeysCollection, source_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = positive_in_all_channels(d[self.source_key])[0]
        if not bool(mask.any()):
            return d
        start, end = [], []
        for axis in range(mask.ndim):
            hit = mask.any(dim=tuple(a for a in range(mask.ndim) if a != axis)).nonzero()[:, 0]
            start.append(int(hit[0]))
            end.append(int(hit[-1]) + 1)
        crop = SpatialCrop(roi_start=start, roi_end=end)
        for key in self.key_iterator(d):
            d[key] = crop(d[key])
        return d
