"""SPAD-ViT data transforms: depth-first reorientation, intensity scaling and token-grid crops.

SPAD-ViT (SPAD-Nets, Luo et al., `arXiv:2312.07630 <https://arxiv.org/abs/2312.07630>`_) takes 2D images
and 3D volumes of any spacing in one network. Its tensors are channel-first ``(C, D, H, W)`` with ``D`` the
through-plane axis, and each sample carries an anisotropy level ``aniso_d``
(:func:`medfm.networks.blocks.spad.aniso_d_from_spacing`) that sets the depth patch size ``16 >> aniso_d``.

- :class:`ReorientToDepthd` (invertible) moves the through-plane axis first and writes ``aniso_d`` and the
  depth-first spacing into the data dict; a 2D image becomes ``(C, 1, H, W)``.
- :class:`ScaleIntensitySpadd` maps 8-bit images by ``/255`` and everything else by its 0.5-99.5 percentiles
  to ``[0, 1]``.
- :class:`SpadRandCropd` crops every key to the same random box of ``tokens`` patches.

The orientation rule lives in :func:`spad_layout`, which :func:`medfm.data.spad.build_spad_datalist` applies
to file headers, so a datalist's ``aniso_d`` and ``spacing`` equal what the transform computes after loading.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import (
    Crop,
    InvertibleTransform,
    MapTransform,
    Pad,
    Randomizable,
)
from monai.transforms.utils_pytorch_numpy_unification import percentile
from monai.utils import TraceKeys

from medfm.networks.blocks.spad import MAX_ANISO_D, aniso_d_from_spacing

from .petct import count_nonfinite

__all__ = [
    "SUPPORTED_INTENSITY",
    "ReorientToDepthd",
    "ScaleIntensitySpadd",
    "SpadLayout",
    "SpadRandCropd",
    "ToRGBd",
    "spad_layout",
    "spad_roi_size",
    "through_plane_axis",
]

SUPPORTED_INTENSITY = ("uint8", "percentile")
"""Values of the intensity key: ``"uint8"`` (8-bit images, divided by 255) or ``"percentile"``."""


def _name(img: Any) -> str:
    """The file an image was loaded from (MetaTensor meta ``filename_or_obj``), for error messages."""
    meta = getattr(img, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return str(name) if name else "<in-memory image>"


def depth_first_spatial(img: Any, transform: str) -> tuple[int, int, int]:
    """The (D, H, W) shape of a (C, D, H, W) image; a ValueError naming the file and ``transform`` otherwise."""
    spatial = tuple(int(n) for n in img.shape[1:])
    if len(spatial) != 3:
        raise ValueError(
            f"{_name(img)}: {transform} expects (C, D, H, W) (run ReorientToDepthd first), got shape "
            f"{tuple(img.shape)}."
        )
    return spatial


def _rounded(s: float) -> float:
    """``s`` to 6 significant digits: float32 header noise removed, so 3.2 / 0.8 mm is exactly a ratio of 4."""
    return float(f"{float(s):.6g}")


def through_plane_axis(spacing: Sequence[float]) -> int:
    """Index (0, 1 or 2) of the through-plane axis of a volume with the given per-axis spacing.

    The through-plane axis is the odd one out: the other two spacings are the closest pair (compared as
    ratios, ``|log(s_j / s_k)|``). Ties go to the larger spacing, then to the later axis, so an isotropic
    volume keeps its last axis (Z of a NIfTI file) as depth.

    >>> [through_plane_axis(s) for s in ((0.7, 0.7, 5.0), (3.0, 0.8, 0.8), (1.0, 1.0, 1.0), (1.0, 2.0, 4.0))]
    [2, 0, 2, 2]
    """
    s = [_rounded(v) for v in spacing]
    if len(s) != 3 or not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing must be three positive finite values, got {tuple(spacing)}.")
    gap = [abs(math.log(s[(i + 1) % 3] / s[(i + 2) % 3])) for i in range(3)]
    best = min(gap)
    return max((i for i in range(3) if gap[i] <= best + 1e-9), key=lambda i: (s[i], i))


class SpadLayout(NamedTuple):
    """Where each axis of an image goes in SPAD's depth-first layout.

    Attributes:
        axes: for output spatial axis ``(D, H, W)``, the input spatial axis it comes from; a 2D input counts
            as 3D with a virtual last axis of size 1 (index 2).
        spacing: ``(s_d, s_h, s_w)`` in mm. For a 2D sample ``s_d`` is nominal: ``2**MAX_ANISO_D`` times the
            finer in-plane spacing, so that ``aniso_d_from_spacing(spacing) == MAX_ANISO_D``.
        aniso_d: anisotropy level, ``aniso_d_from_spacing(spacing)``; ``MAX_ANISO_D`` for 2D.
        dim: 2 for a 2D image (2 spatial axes, or exactly one spatial axis of size 1), else 3.
    """

    axes: tuple[int, int, int]
    spacing: tuple[float, float, float]
    aniso_d: int
    dim: int


def spad_layout(spatial_shape: Sequence[int], spacing: Sequence[float]) -> SpadLayout:
    """Depth-first layout of an image from its spatial shape and per-axis spacing (array axis order).

    A 2D image (two spatial axes, or three with exactly one of size 1) has its size-1 axis as depth; a volume
    has :func:`through_plane_axis` as depth. The two in-plane axes keep their relative order.

    Args:
        spatial_shape: 2 or 3 sizes, e.g. ``(X, Y, Z)``.
        spacing: the matching spacings in mm (column norms of the affine).

    Returns:
        :class:`SpadLayout`.
    """
    shape = [int(n) for n in spatial_shape]
    sp = [float(s) for s in spacing]
    if len(shape) not in (2, 3) or len(sp) != len(shape):
        raise ValueError(
            f"expected 2 or 3 spatial sizes with as many spacings, got shape {tuple(shape)}, spacing {tuple(sp)}."
        )
    if len(shape) == 2:
        shape, sp = [*shape, 1], [*sp, 1.0]
    singletons = [i for i, n in enumerate(shape) if n == 1]
    depth = singletons[0] if len(singletons) == 1 else through_plane_axis(sp)
    axes = (depth, *(i for i in range(3) if i != depth))
    s_h, s_w = _rounded(sp[axes[1]]), _rounded(sp[axes[2]])
    if len(singletons) == 1:
        if not all(math.isfinite(v) and v > 0 for v in (s_h, s_w)):
            raise ValueError(f"spacing must be positive and finite, got {tuple(spacing)}.")
        return SpadLayout(axes, (float(1 << MAX_ANISO_D) * min(s_h, s_w), s_h, s_w), MAX_ANISO_D, 2)
    spacing_dhw = (_rounded(sp[depth]), s_h, s_w)
    return SpadLayout(axes, spacing_dhw, aniso_d_from_spacing(spacing_dhw), 3)


def _permutation_affine(axes: Sequence[int]) -> torch.Tensor:
    """``P`` (4, 4) with ``affine_out = affine_in @ P`` for output spatial axis ``k`` = input axis ``axes[k]``."""
    p = torch.zeros(4, 4, dtype=torch.float64)
    for k, a in enumerate(axes):
        p[a, k] = 1.0
    p[3, 3] = 1.0
    return p


def _set_affine(img: MetaTensor, affine: torch.Tensor) -> None:
    """Set ``img.affine`` and keep a NIfTI-style ``pixdim`` entry of its meta in step (as MONAI does)."""
    img.affine = affine
    pixdim = img.meta.get("pixdim")
    if pixdim is not None and len(pixdim) >= 4:
        pixdim[1:4] = affine_to_spacing(affine, r=3)


class ReorientToDepthd(MapTransform, InvertibleTransform):
    """Put the through-plane axis first: ``(C, X, Y, Z)`` or ``(C, H, W)`` -> ``(C, D, H, W)`` (invertible).

    The layout comes from the first key's spatial shape and affine spacing (:func:`spad_layout`): a volume's
    depth is its odd-one-out spacing axis, a 2D image ``(C, H, W)`` gets a depth axis of size 1 and a 4x4
    affine whose depth column is the virtual third axis of its affine (unit length for a 3x3 input affine).
    The affine is permuted with the array, so every voxel keeps its world coordinates. Every key gets the same
    permutation and must have the first key's spatial shape. Writes ``data[aniso_key]`` (int) and
    ``data[spacing_key]`` (``[s_d, s_h, s_w]`` floats; for 2D ``s_d`` is the nominal ``32 * min(s_h, s_w)``,
    see :class:`SpadLayout`). :meth:`inverse` (e.g. through ``monai.transforms.Invertd`` on a prediction)
    restores the original shape and affine exactly.

    Args:
        keys: keys of MetaTensors to reorient; the first present one sets the layout.
        aniso_key: where to write the anisotropy level.
        spacing_key: where to write the depth-first spacing.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        aniso_key: str = "aniso_d",
        spacing_key: str = "spacing",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.aniso_key = aniso_key
        self.spacing_key = spacing_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        ref = d[keys[0]]
        if not isinstance(ref, MetaTensor):
            raise TypeError(
                f"ReorientToDepthd needs {keys[0]!r} as a MetaTensor with an affine (LoadImaged + "
                f"EnsureChannelFirstd), got {type(ref).__name__}."
            )
        spatial = tuple(int(n) for n in ref.shape[1:])
        if len(spatial) not in (2, 3):
            raise ValueError(
                f"{_name(ref)}: expected a channel-first 2D (C, H, W) or 3D (C, X, Y, Z) image, got shape "
                f"{tuple(ref.shape)}."
            )
        spacing = affine_to_spacing(ref.affine, r=len(spatial)).tolist()
        layout = spad_layout(spatial, spacing)
        for key in keys:
            img = d[key]
            if tuple(int(n) for n in img.shape[1:]) != spatial:
                raise ValueError(
                    f"{_name(ref)}: {key!r} ({_name(img)}) has spatial shape {tuple(img.shape[1:])}, expected "
                    f"{spatial} as {keys[0]!r}."
                )
            d[key] = self._forward(img, layout.axes)
        d[self.aniso_key] = int(layout.aniso_d)
        d[self.spacing_key] = [float(s) for s in layout.spacing]
        return d

    def _forward(self, img: Any, axes: tuple[int, int, int]) -> Any:
        img = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
        orig_size = tuple(int(n) for n in img.shape[1:])
        added = img.ndim == 3
        rank = None
        if isinstance(img, MetaTensor):
            rank = int(img.affine.shape[-1]) - 1
            if rank == 2:  # embed a 2D affine: the virtual third axis gets a unit world axis
                a = torch.eye(4, dtype=torch.float64)
                a[np.ix_([0, 1, 3], [0, 1, 3])] = img.affine.to(torch.float64)
                img = img.clone()
                _set_affine(img, a)
        out = (img.unsqueeze(-1) if added else img).permute(0, *(1 + a for a in axes)).contiguous()
        if not isinstance(out, MetaTensor):
            return out
        info = {"axes": list(axes), "added_axis": added, "affine_rank": rank}
        self.push_transform(out, affine=_permutation_affine(axes), extra_info=info, orig_size=orig_size)
        return out

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            info = self.pop_transform(img)[TraceKeys.EXTRA_INFO]
            axes = [int(a) for a in info["axes"]]
            out = img.permute(0, *(1 + int(i) for i in np.argsort(axes))).contiguous()
            affine = img.affine.to(torch.float64) @ _permutation_affine(axes).T
            if info["added_axis"]:
                out = out.squeeze(-1)
            if info["affine_rank"] == 2:
                affine = affine[np.ix_([0, 1, 3], [0, 1, 3])]
            _set_affine(out, affine)
            d[key] = out
        return d


class ScaleIntensitySpadd(MapTransform):
    """SPAD-ViT intensity normalisation to ``[0, 1]``, chosen per sample by ``data[intensity_key]``.

    ``"uint8"`` (8-bit natural images, PNG/JPEG): divided by 255. ``"percentile"`` (the default when the key
    is absent): the ``lower``-``upper`` percentiles are mapped to ``[0, 1]`` and the result clipped (MONAI
    ``ScaleIntensityRange``). As in the reference's preprocessing, the percentiles are taken over the voxels
    above the image's minimum (``above_min``), so the padding or air at the minimum of a scan does not pull the
    lower bound down; an image with no voxel above its minimum (constant) becomes 0. Output is float32. NaN or
    Inf input raises a ValueError naming the file.

    Args:
        keys: image keys (not labels).
        lower: lower percentile, in ``[0, 100]``.
        upper: upper percentile, in ``[lower, 100]``.
        intensity_key: key holding ``"uint8"`` or ``"percentile"`` (see :data:`SUPPORTED_INTENSITY`).
        channel_wise: percentiles per channel instead of over the whole image.
        above_min: take the percentiles over the voxels above the minimum (the reference's); ``False`` takes
            all voxels.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        lower: float = 0.5,
        upper: float = 99.5,
        intensity_key: str = "intensity",
        channel_wise: bool = False,
        above_min: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= lower <= upper <= 100.0:
            raise ValueError(f"need 0 <= lower <= upper <= 100, got lower={lower}, upper={upper}.")
        self.intensity_key = intensity_key
        self.lower, self.upper = float(lower), float(upper)
        self.channel_wise = bool(channel_wise)
        self.above_min = bool(above_min)

    def _scale(self, img: torch.Tensor) -> torch.Tensor:
        """``img`` (float32) with its percentiles (over the voxels above its minimum) mapped to [0, 1], clipped."""
        values = img[img > img.min()] if self.above_min else img.flatten()
        if values.numel() == 0:
            return torch.zeros_like(img)
        lo, hi = (float(v) for v in percentile(values, [self.lower, self.upper]))
        if hi <= lo:
            return (img > lo).to(img.dtype)  # a two-level image: its lower level 0, the rest 1
        return ((img - lo) / (hi - lo)).clamp(0.0, 1.0)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mode = d.get(self.intensity_key, "percentile")
        if mode not in SUPPORTED_INTENSITY:
            raise ValueError(f"{self.intensity_key} must be one of {SUPPORTED_INTENSITY}, got {mode!r}.")
        for key in self.key_iterator(d):
            img = d[key]
            n = count_nonfinite(img)
            if n:
                raise ValueError(
                    f"{_name(img)}: {key!r} has {n} non-finite voxels (NaN or Inf) out of {int(np.prod(img.shape))}."
                )
            t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
            t = t.to(torch.float32)
            if mode == "uint8":
                d[key] = t / 255.0
            elif self.channel_wise:
                d[key] = torch.stack([self._scale(c) for c in t])
            else:
                d[key] = self._scale(t)
        return d


class ToRGBd(MapTransform):
    """Three channels, as SPAD-ViT's release takes: grey images are replicated, RGBA / grey+alpha lose alpha.

    Channel-first input ``(C, ...)`` with C in {1, 3} for any image, and C in {2 (grey + alpha), 4 (RGBA)} for
    8-bit natural images only (``data[intensity_key] == "uint8"``, as :func:`medfm.data.build_spad_datalist`
    marks PNG/JPEG files). A 2- or 4-channel scan (e.g. in- and opposed-phase MR, or four MR sequences in one
    file) has no alpha channel, and dropping one would lose data silently: it raises a ValueError naming the
    file, as does any other channel count. The release trains on each channel of a multi-channel scan as its own
    image; store them as separate files. MetaTensor metadata is kept.

    Args:
        keys: image keys.
        intensity_key: key of the intensity kind (see :data:`SUPPORTED_INTENSITY`); absent means a scan.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self, keys: KeysCollection, intensity_key: str = "intensity", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.intensity_key = intensity_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        natural = d.get(self.intensity_key) == "uint8"
        for key in self.key_iterator(d):
            img = d[key]
            c = img.shape[0]
            if c in (2, 4) and not natural:
                raise ValueError(
                    f"{_name(img)}: {key!r} has {c} channels; only an 8-bit natural image (PNG/JPEG) is read as "
                    f"{'grey' if c == 2 else 'RGB'} + alpha. A {c}-channel scan would lose a channel: store each "
                    "channel as its own file."
                )
            if c in (1, 2):
                d[key] = img[:1].repeat(3, *([1] * (img.ndim - 1)))
            elif c in (3, 4):
                d[key] = img[:3]
            else:
                raise ValueError(f"{_name(img)}: {key!r} has {c} channels; expected grey (1), RGB (3) or with alpha.")
        return d


def spad_roi_size(
    tokens: Sequence[int], aniso_d: int, patch_size: int = 16, is_2d: bool = False
) -> tuple[int, int, int]:
    """Crop size ``(D, H, W)`` holding a ``tokens = (t_d, t_h, t_w)`` grid of SPAD patches.

    The depth patch is ``max(patch_size >> aniso_d, 1)``. A 2D image, and a volume whose level is past the
    depth patch (``2**aniso_d > patch_size``: 5 for patch 16, slices at least 32 times the in-plane spacing),
    gives one slice, as in the reference: so every sample of an ``aniso_d`` batch has the same crop depth and
    the batch collates.

    >>> spad_roi_size((5, 10, 10), 2), spad_roi_size((5, 10, 10), 5, is_2d=True), spad_roi_size((5, 10, 10), 5)
    ((20, 160, 160), (1, 160, 160), (1, 160, 160))
    """
    t = tuple(int(n) for n in tokens)
    if len(t) != 3 or min(t) < 1:
        raise ValueError(f"tokens must be three positive counts (depth, height, width), got {tuple(tokens)}.")
    if not 0 <= int(aniso_d) <= MAX_ANISO_D:
        raise ValueError(f"aniso_d must be in [0, {MAX_ANISO_D}], got {aniso_d}.")
    if int(patch_size) < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size}.")
    single = is_2d or (1 << int(aniso_d)) > int(patch_size)
    depth = 1 if single else t[0] * max(int(patch_size) >> int(aniso_d), 1)
    return depth, t[1] * int(patch_size), t[2] * int(patch_size)


class SpadRandCropd(Randomizable, MapTransform, InvertibleTransform):
    """Crop every key to the same box of ``tokens`` SPAD patches (:func:`spad_roi_size`), zero-padding first.

    Input is ``(C, D, H, W)`` (after :class:`ReorientToDepthd`); a depth-1 image counts as 2D. Axes smaller
    than the box are zero-padded symmetrically (labels get background 0), then one box is drawn, uniformly
    among all positions (``random_center=True``) or centred, and applied to every key. The affine follows
    (MONAI ``Pad``/``Crop``) and :meth:`inverse` undoes crop and pad. Seed with ``set_random_state``.

    Args:
        keys: keys to crop; all must share the first key's spatial shape.
        tokens: token grid ``(t_d, t_h, t_w)`` per crop (SPAD-ViT pre-training: 5 x 10 x 10).
        patch_size: in-plane patch size (16).
        aniso_key: key of the anisotropy level (written by :class:`ReorientToDepthd`).
        random_center: random box position; ``False`` takes the centre box.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        tokens: Sequence[int] = (5, 10, 10),
        patch_size: int = 16,
        aniso_key: str = "aniso_d",
        random_center: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        spad_roi_size(tokens, 0, patch_size)  # validates tokens and patch_size
        self.tokens = tuple(int(n) for n in tokens)
        self.patch_size = int(patch_size)
        self.aniso_key = aniso_key
        self.random_center = bool(random_center)
        self._padder = Pad(mode="constant")
        self._cropper = Crop()
        self._start: tuple[int, ...] = ()

    def randomize(self, spatial_shape: Sequence[int], roi_size: Sequence[int]) -> None:
        """Draw the box start for an image of ``spatial_shape`` (each >= ``roi_size``)."""
        if self.random_center:
            self._start = tuple(int(self.R.randint(0, n - r + 1)) for n, r in zip(spatial_shape, roi_size))
        else:
            self._start = tuple((n - r) // 2 for n, r in zip(spatial_shape, roi_size))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        ref = d[keys[0]]
        spatial = depth_first_spatial(ref, "SpadRandCropd")
        if self.aniso_key not in d:
            raise ValueError(f"{_name(ref)}: no {self.aniso_key!r} in the data (run ReorientToDepthd first).")
        roi = spad_roi_size(self.tokens, int(d[self.aniso_key]), self.patch_size, is_2d=spatial[0] == 1)
        for key in keys[1:]:
            if tuple(int(n) for n in d[key].shape[1:]) != spatial:
                raise ValueError(
                    f"{_name(ref)}: {key!r} has spatial shape {tuple(d[key].shape[1:])}, expected {spatial}."
                )
        extra = [max(r - n, 0) for n, r in zip(spatial, roi)]
        to_pad = [(0, 0)] + [(e // 2, e - e // 2) for e in extra]
        self.randomize([n + e for n, e in zip(spatial, extra)], roi)
        slices = tuple(slice(s, s + r) for s, r in zip(self._start, roi))
        for key in keys:
            d[key] = self._cropper(self._padder(d[key], to_pad=to_pad), slices)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._padder.inverse(self._cropper.inverse(d[key]))
        return d
