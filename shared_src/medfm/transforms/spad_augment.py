"""SPAD-ViT pre-training scale augmentation: a per-sample in-plane / through-plane scale that sets ``aniso_d``.

SPAD-ViT (SPAD-Nets, Luo et al., `arXiv:2312.07630 <https://arxiv.org/abs/2312.07630>`_) pre-trains on images
whose spacing is changed per sample: a random in-plane scale (and, for near-isotropic volumes, a through-plane
scale) multiplies the voxel spacing, so a volume's anisotropy level ``aniso_d`` varies from sample to sample.
Batches hold one level, so the level must be known when the batch is formed: :class:`SpadScaleAugment` draws
the scales from the sample's header (spacing and shape) and is called by the batch sampler
(:class:`medfm.data.AnisoBatchSampler`), which hands the draw to the dataset with the index
(:class:`medfm.data.SpadDrawDataset`); :class:`SpadRandAffineCropd` then resamples the crop accordingly.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Affine, Crop, MapTransform, Pad, Randomizable

from medfm.networks.blocks.spad import MAX_ANISO_D, aniso_d_from_spacing

from .spad import _name, depth_first_spatial, spad_roi_size

__all__ = ["SpadRandAffineCropd", "SpadScaleAugment"]


def _range(value: Sequence[float], name: str) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {tuple(value)}.")
    return lo, hi


def _prob(value: float, name: str) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}.")
    return float(value)


class SpadScaleAugment:
    """Draw a sample's scale, its anisotropy level after scaling and its crop size (defaults: the reference's).

    With probability ``scale_xy_prob`` the in-plane scale ``s_xy`` is uniform between ``scale_xy[0]`` and
    ``min(scale_xy[1], n_xy / crop_xy)`` (``n_xy`` the shorter in-plane side, ``crop_xy`` the in-plane crop:
    an image no larger than the crop is not shrunk further), else 1. A volume whose slice spacing is at most
    ``isotropic_th`` times the in-plane spacing also gets, with probability ``scale_z_prob``, a through-plane
    scale ``s_z`` uniform in ``scale_z``, else 1. The scaled spacing is ``(s_d * s_z, s_h * s_xy, s_w * s_xy)``
    and ``aniso_d = aniso_d_from_spacing(scaled spacing)``; the crop is :func:`medfm.transforms.spad_roi_size`
    at that level (one slice at the top level, as for 2D images).

    Args:
        tokens: token grid ``(t_d, t_h, t_w)`` of a crop.
        patch_size: in-plane patch size.
        scale_xy: range of the in-plane scale (a scale above 1 coarsens the spacing: the crop sees more).
        scale_xy_prob: probability of an in-plane scale.
        scale_z: range of the through-plane scale.
        scale_z_prob: probability of a through-plane scale (near-isotropic volumes only).
        isotropic_th: a volume is near-isotropic when ``s_d <= isotropic_th * min(s_h, s_w)``.
    """

    def __init__(
        self,
        tokens: Sequence[int] = (5, 10, 10),
        patch_size: int = 16,
        scale_xy: Sequence[float] = (0.75, 2.0),
        scale_xy_prob: float = 0.5,
        scale_z: Sequence[float] = (0.8, 1.25),
        scale_z_prob: float = 0.3,
        isotropic_th: float = 1.5,
    ) -> None:
        spad_roi_size(tokens, 0, patch_size)  # validates tokens and patch size
        self.tokens = tuple(int(t) for t in tokens)
        self.patch_size = int(patch_size)
        self.scale_xy = _range(scale_xy, "scale_xy")
        self.scale_z = _range(scale_z, "scale_z")
        self.scale_xy_prob = _prob(scale_xy_prob, "scale_xy_prob")
        self.scale_z_prob = _prob(scale_z_prob, "scale_z_prob")
        if not float(isotropic_th) >= 1.0:
            raise ValueError(f"isotropic_th must be >= 1, got {isotropic_th}.")
        self.isotropic_th = float(isotropic_th)

    def draw(self, rng: np.random.Generator, spacing: Sequence[float], shape: Sequence[int]) -> dict[str, Any]:
        """One draw for a sample of depth-first ``spacing`` ``(s_d, s_h, s_w)`` and spatial ``shape`` ``(D, H, W)``.

        Returns:
            ``{"aniso_d": int, "scale": [s_z, s_xy, s_xy], "roi": [D, H, W]}``.
        """
        s_d, s_h, s_w = (float(s) for s in spacing)
        s_x = min(s_h, s_w)
        crop_xy = self.tokens[1] * self.patch_size
        scale_xy = 1.0
        if rng.random() < self.scale_xy_prob:
            hi = min(self.scale_xy[1], min(int(n) for n in shape[1:]) / crop_xy)
            lo = self.scale_xy[0]
            scale_xy = lo + (hi - lo) * float(rng.random())  # hi < lo: an image smaller than the crop zooms in
        scale_z = 1.0
        if s_d <= self.isotropic_th * s_x and rng.random() < self.scale_z_prob:
            scale_z = self.scale_z[0] + (self.scale_z[1] - self.scale_z[0]) * float(rng.random())
        is_2d = int(shape[0]) == 1  # a 2D image stays at the top level: its depth spacing is nominal
        level = MAX_ANISO_D if is_2d else aniso_d_from_spacing((s_d * scale_z, s_h * scale_xy, s_w * scale_xy))
        roi = spad_roi_size(self.tokens, level, self.patch_size, is_2d=is_2d)
        return {"aniso_d": int(level), "scale": [scale_z, scale_xy, scale_xy], "roi": list(roi)}


class SpadRandAffineCropd(Randomizable, MapTransform):
    """Crop ``(C, D, H, W)`` images to a token box, resampled by the sample's drawn scale and a random rotation.

    The scale and crop come from ``data[draw_key]`` (a :meth:`SpadScaleAugment.draw`, put there by
    :class:`medfm.data.SpadDrawDataset`); without it the scale is 1 and the crop is
    ``spad_roi_size(tokens, data[aniso_key])``. A box of the crop size is placed uniformly in the image (padded
    symmetrically when smaller, as :class:`medfm.transforms.SpadRandCropd`); the output samples that box's
    centre with the grid scaled by ``scale`` (the output spacing is ``spacing * scale``, so ``scale > 1`` sees a
    larger region) and, with probability ``rotate_prob``, rotated by angles uniform in ``±rotate_range``
    (radians; about the depth axis, then the two in-plane axes; the latter only for a near-isotropic volume,
    ``s_d <= isotropic_th * min(s_h, s_w)``). Samples outside the image are reflected. Without scale and
    rotation the crop is exact slicing. Writes the level into ``data[aniso_key]`` and the scaled spacing into
    ``data[spacing_key]``. Seed with ``set_random_state``.

    Args:
        keys: image keys (resampled bilinearly); all share the first key's shape.
        tokens: token grid of the crop when no draw is given.
        patch_size: in-plane patch size.
        rotate_prob: probability of a rotation (reference: 0.3).
        rotate_range: maximum angles about the depth, height and width axes (reference: 90°, 30°, 30°).
        isotropic_th: near-isotropic threshold for the off-plane rotations (reference: 1.5).
        aniso_key: key of the anisotropy level.
        spacing_key: key of the depth-first spacing (written by :class:`medfm.transforms.ReorientToDepthd`).
        draw_key: key of the scale draw.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        tokens: Sequence[int] = (5, 10, 10),
        patch_size: int = 16,
        rotate_prob: float = 0.3,
        rotate_range: Sequence[float] = (math.pi / 2, math.pi / 6, math.pi / 6),
        isotropic_th: float = 1.5,
        aniso_key: str = "aniso_d",
        spacing_key: str = "spacing",
        draw_key: str = "spad_draw",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        spad_roi_size(tokens, 0, patch_size)
        self.tokens = tuple(int(t) for t in tokens)
        self.patch_size = int(patch_size)
        self.rotate_prob = _prob(rotate_prob, "rotate_prob")
        self.rotate_range = tuple(float(r) for r in rotate_range)
        if len(self.rotate_range) != 3 or min(self.rotate_range) < 0:
            raise ValueError(f"rotate_range must be three non-negative angles, got {tuple(rotate_range)}.")
        self.isotropic_th = float(isotropic_th)
        self.aniso_key, self.spacing_key, self.draw_key = aniso_key, spacing_key, draw_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        ref = d[keys[0]]
        spatial = depth_first_spatial(ref, type(self).__name__)
        if self.spacing_key not in d:
            raise ValueError(f"{_name(ref)}: no {self.spacing_key!r} in the data (keep it from ReorientToDepthd).")
        spacing = [float(s) for s in d[self.spacing_key]]
        draw = d.pop(self.draw_key, None)
        if draw is None:
            if self.aniso_key not in d:
                raise ValueError(f"{_name(ref)}: no {self.aniso_key!r} in the data (run ReorientToDepthd first).")
            scale, level = [1.0, 1.0, 1.0], int(d[self.aniso_key])
            roi = spad_roi_size(self.tokens, level, self.patch_size, is_2d=spatial[0] == 1)
        else:
            scale, level, roi = [float(s) for s in draw["scale"]], int(draw["aniso_d"]), tuple(draw["roi"])
        if not 0 <= level <= MAX_ANISO_D:
            raise ValueError(f"{_name(ref)}: aniso_d must be in [0, {MAX_ANISO_D}], got {level}.")
        for key in keys[1:]:
            if tuple(int(n) for n in d[key].shape[1:]) != spatial:
                raise ValueError(
                    f"{_name(ref)}: {key!r} has spatial shape {tuple(d[key].shape[1:])}, expected {spatial}."
                )
        extra = [max(r - n, 0) for n, r in zip(spatial, roi)]
        start = [int(self.R.randint(0, n + e - r + 1)) for n, e, r in zip(spatial, extra, roi)]
        angles = [0.0, 0.0, 0.0]
        if self.R.random_sample() < self.rotate_prob:
            off_plane = spacing[0] <= self.isotropic_th * min(spacing[1:])
            angles = [
                float(self.R.uniform(-r, r)) if (k == 0 or off_plane) else 0.0 for k, r in enumerate(self.rotate_range)
            ]
        if scale == [1.0, 1.0, 1.0] and angles == [0.0, 0.0, 0.0]:
            pad = Pad(to_pad=[(0, 0)] + [(e // 2, e - e // 2) for e in extra], mode="constant")
            crop = Crop()
            slices = tuple(slice(s, s + r) for s, r in zip(start, roi))
            for key in keys:
                d[key] = crop(pad(d[key]), slices)
        else:
            # crop centre in voxel coordinates of the unpadded image, relative to the image centre
            shift = [s - e // 2 + (r - 1) / 2 - (n - 1) / 2 for s, e, r, n in zip(start, extra, roi, spatial)]
            affine = Affine(
                rotate_params=angles, scale_params=scale, translate_params=shift, spatial_size=roi,
                mode="bilinear", padding_mode="reflection", image_only=True,
            )  # fmt: skip
            for key in keys:
                img = d[key] if isinstance(d[key], torch.Tensor) else torch.as_tensor(np.asarray(d[key]))
                d[key] = affine(img.float())
        d[self.aniso_key] = level
        d[self.spacing_key] = [s * f for s, f in zip(spacing, scale)]
        return d
