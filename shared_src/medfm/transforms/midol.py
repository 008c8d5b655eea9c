"""M-IDoL's multi-crop augmentation (DINO's), intensity scaling and evaluation resize, for channel-first 2D images.

M-IDoL (public code LYH-hh/M-IDoL) pre-trains with DINO's augmentation (Caron et al., `arXiv:2104.14294
<https://arxiv.org/abs/2104.14294>`_, ``DataAugmentationDINO``) with its own local-crop size: two global crops
(scale 0.4-1, 224 px) and two local crops (scale 0.05-0.4) also of 224 px (DINO: eight of 96 px; a window-7
Swin's last stage would be 3x3 tokens padded to 7x7), each with a horizontal flip (p 0.5), colour jitter (brightness
0.4, contrast 0.4, saturation 0.2, hue 0.1, in random order, p 0.8), greyscale (p 0.2), Gaussian blur (sigma
0.1-2 px; p 1.0 and 0.1 for the two global crops, 0.5 for local crops), solarisation (p 0.2, second global
crop only), then ImageNet normalisation.

The crop is a slice and the resize PyTorch's bicubic interpolation with ``antialias=True`` (the filter of
torchvision's ``RandomResizedCrop`` on tensors, like PIL's area-aware bicubic resampling), in place of MONAI's
Gaussian pre-filter and bicubic ``Resize``; the views stay plain tensors between MONAI's transforms. Together these
took the four views of a 512-px image from 0.28 s to 0.10 s on one thread. Taken from MONAI: ``RandFlip``, brightness
(``RandScaleIntensity``: ``x * (1 + f)``, ``f ~ U(-0.4, 0.4)``), contrast (``RandScaleIntensityFixedMean``:
``(x - mean) * (1 + f) + mean``; the mean is over all channels where torchvision takes the luma mean),
``GaussianSmooth`` and ``NormalizeIntensity``. Written here, as MONAI lacks them: the RandomResizedCrop box rule
(area scale and log-uniform aspect ratio 3/4-4/3; MONAI's random-size crop draws each side uniformly),
saturation, hue, greyscale (luma weights 0.299, 0.587, 0.114), solarisation (``x >= 128/255 -> 1 - x`` as PIL)
and an isotropic blur draw (MONAI's ``RandGaussianSmooth`` draws one sigma per axis).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import (
    GaussianSmooth,
    InvertibleTransform,
    MapTransform,
    NormalizeIntensity,
    NormalizeIntensityd,
    RandFlip,
    Randomizable,
    RandScaleIntensity,
    RandScaleIntensityFixedMean,
    Resize,
    Resized,
    ScaleIntensity,
)
from monai.transforms.utils import allow_missing_keys_mode
from monai.utils import convert_to_tensor

from .checks import MinSpatialSized
from .planar import RowsFirstd
from .spad import ToRGBd

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MIDoLInputd",
    "MultiCropd",
    "ResizeNormalized",
    "ScaleIntensity8Bitd",
    "adjust_hue",
    "adjust_saturation",
    "dino_crop_box",
    "grey",
    "solarize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = (0.299, 0.587, 0.114)


def _name(img: Any) -> str:
    """The file an image was loaded from (MetaTensor meta ``filename_or_obj``), for error messages."""
    name = (getattr(img, "meta", None) or {}).get("filename_or_obj")
    return str(name) if name else "<in-memory image>"


def _rgb01(img: Any, key: Hashable) -> torch.Tensor:
    """A float32 ``(3, H, W)`` tensor in ``[0, 1]`` from a channel-first 2D image (grey replicated, alpha dropped)."""
    t = convert_to_tensor(img, dtype=torch.float32, track_meta=False)
    if t.ndim != 3 or t.shape[0] not in (1, 2, 3, 4):
        raise ValueError(
            f"{_name(img)}: {key!r} must be a channel-first 2D image (C, H, W) with C in 1-4, "
            f"got shape {tuple(t.shape)}."
        )
    if not torch.isfinite(t).all():
        raise ValueError(f"{_name(img)}: {key!r} has {int((~torch.isfinite(t)).sum())} non-finite values (NaN or Inf).")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(
            f"{_name(img)}: {key!r} has values in [{lo:g}, {hi:g}]; expected [0, 1] (scale 8-bit images by 1/255, "
            "e.g. ScaleIntensityRanged(a_min=0, a_max=255, b_min=0, b_max=1))."
        )
    t = t[:1].expand(3, -1, -1) if t.shape[0] in (1, 2) else t[:3]
    return t.clamp(0, 1).contiguous()


def grey(img: torch.Tensor) -> torch.Tensor:
    """Luma ``0.299 R + 0.587 G + 0.114 B`` of a ``(3, H, W)`` image, as ``(1, H, W)`` (torchvision's greyscale)."""
    w = torch.tensor(_LUMA, dtype=img.dtype, device=img.device)
    return (img * w[:, None, None]).sum(0, keepdim=True)


def solarize(img: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert values at or above ``threshold``: ``x >= t -> 1 - x`` (PIL's ``ImageOps.solarize`` on ``[0, 1]``)."""
    return torch.where(img >= threshold, 1.0 - img, img)


def adjust_saturation(img: torch.Tensor, factor: float) -> torch.Tensor:
    """Blend a ``(3, H, W)`` image with its greyscale: ``factor * x + (1 - factor) * grey(x)``, clipped to [0, 1]."""
    return (factor * img + (1.0 - factor) * grey(img)).clamp(0, 1)


def adjust_hue(img: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue of a ``(3, H, W)`` RGB image in ``[0, 1]`` by ``shift`` turns (HSV round trip)."""
    r, g, b = img.unbind(0)
    maxc, minc = img.max(0).values, img.min(0).values
    delta = maxc - minc
    v, s = maxc, torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    h6 = ((h + shift) % 1.0) * 6.0
    k = torch.stack([(h6 + n) % 6.0 for n in (5.0, 3.0, 1.0)])  # closed-form HSV -> RGB per channel
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0, 1)


def dino_crop_box(
    rng: np.random.RandomState,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box ``(top, left, h, w)``: area ``U(scale) * H * W``, aspect ``w / h`` log-uniform.

    Ten draws, as torchvision; if none fits, the largest centred box of aspect within ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.randint(0, height - h + 1)), int(rng.randint(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


class _DinoView(Randomizable):
    """One DINO view of a ``(3, H, W)`` image in ``[0, 1]``: crop, flip, jitter, grey, blur, solarise, normalise."""

    def __init__(self, size: int, scale: Sequence[float], blur_prob: float, solarize_prob: float, cfg: dict) -> None:
        self.scale, self.blur_prob, self.solarize_prob, self.cfg = tuple(scale), blur_prob, solarize_prob, cfg
        self.size = int(size)
        self.flip = RandFlip(prob=cfg["flip_prob"], spatial_axis=cfg["flip_axis"])
        self.brightness = RandScaleIntensity(factors=cfg["brightness"], prob=1.0)
        self.contrast = RandScaleIntensityFixedMean(prob=1.0, factors=cfg["contrast"], fixed_mean=True)
        self.normalize = NormalizeIntensity(subtrahend=cfg["mean"], divisor=cfg["std"], channel_wise=True)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> _DinoView:
        super().set_random_state(seed, state)
        for t in (self.flip, self.brightness, self.contrast):
            t.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        """Draws happen inside :meth:`__call__` from the shared ``self.R``."""

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        for op in self.R.permutation(4):  # torchvision's ColorJitter applies its four ops in random order
            if op == 0 and cfg["brightness"] > 0:  # plain tensors: MetaTensor dispatch costs more than these ops
                x = convert_to_tensor(self.brightness(x), track_meta=False).clamp(0, 1)
            elif op == 1 and cfg["contrast"] > 0:
                x = convert_to_tensor(self.contrast(x), track_meta=False).clamp(0, 1)
            elif op == 2 and cfg["saturation"] > 0:
                x = adjust_saturation(x, self.R.uniform(1 - cfg["saturation"], 1 + cfg["saturation"]))
            elif op == 3 and cfg["hue"] > 0:
                x = adjust_hue(x, self.R.uniform(-cfg["hue"], cfg["hue"]))
        return x

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        top, left, h, w = dino_crop_box(self.R, img.shape[1], img.shape[2], self.scale)
        x = img[None, :, top : top + h, left : left + w]
        x = F.interpolate(x, (self.size, self.size), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
        x = convert_to_tensor(self.flip(x), track_meta=False)
        if self.R.rand() < cfg["jitter_prob"]:
            x = convert_to_tensor(self._jitter(x), track_meta=False)
        if self.R.rand() < cfg["grey_prob"]:
            x = grey(x).repeat(3, 1, 1)  # a copy: NormalizeIntensity writes channels in place
        if self.R.rand() < self.blur_prob:
            sigma = float(self.R.uniform(*cfg["blur_sigma"]))
            x = convert_to_tensor(GaussianSmooth(sigma=sigma)(x), track_meta=False)
        if self.R.rand() < self.solarize_prob:
            x = solarize(x)
        return convert_to_tensor(self.normalize(x), dtype=torch.float32, track_meta=False).contiguous()


def _probs(value: float | Sequence[float], name: str) -> tuple[float, ...]:
    p = tuple(float(v) for v in (value if isinstance(value, Sequence) else (value,)))
    if not p or not all(0.0 <= v <= 1.0 for v in p):
        raise ValueError(f"{name} must be probabilities in [0, 1], got {value}.")
    return p


class MultiCropd(Randomizable, MapTransform):
    """DINO multi-crop of one image key into ``global_<i>`` and ``local_<j>`` views (M-IDoL's pre-training input).

    Input: ``data[key]`` channel-first 2D ``(C, H, W)`` in ``[0, 1]`` with C 1 (replicated to RGB), 2 (grey +
    alpha), 3 or 4 (RGBA); values outside ``[0, 1]``, NaN/Inf or another shape raise a ValueError naming the file.
    Output: ``data[prefix_global + str(i)]`` float32 ``(3, global_size, global_size)`` for ``i < num_global`` and
    ``data[prefix_local + str(j)]`` ``(3, local_size, local_size)`` for ``j < num_local``, ImageNet-normalised
    (module doc for each step). The source key is removed unless ``keep_source`` (images of different sizes do
    not collate). Global crop ``i`` uses ``global_blur_prob[i % len]`` and ``global_solarize_prob[i % len]``.
    Seed with ``set_random_state``.

    Args:
        keys: the one image key.
        global_size: side of the global crops (DINO: 224).
        local_size: side of the local crops (M-IDoL's reference code: 224; DINO: 96).
        num_global: number of global crops (2).
        num_local: number of local crops (M-IDoL's reference code: 2; DINO: 8).
        global_scale: area fraction range of the global crops (DINO: 0.4-1).
        local_scale: area fraction range of the local crops (DINO: 0.05-0.4).
        prefix_global: output key prefix of the global crops.
        prefix_local: output key prefix of the local crops.
        global_blur_prob: blur probability per global crop (DINO: 1.0, 0.1).
        local_blur_prob: blur probability of the local crops (DINO: 0.5).
        global_solarize_prob: solarisation probability per global crop (DINO: 0, 0.2).
        flip_prob: flip probability (0.5).
        flip_axis: spatial axis flipped: 1 is the last, the width of an ``(H, W)`` array (the horizontal flip of
            an image presented rows first by :class:`medfm.transforms.RowsFirstd`).
        brightness: brightness jitter strength (0.4).
        contrast: contrast jitter strength (0.4).
        saturation: saturation jitter strength (0.2).
        hue: hue jitter, turns (0.1; at most 0.5).
        jitter_prob: probability of colour jitter (0.8).
        grey_prob: probability of greyscale (0.2).
        blur_sigma: range of the blur sigma in output pixels (0.1, 2.0).
        mean: per-channel normalisation mean (ImageNet).
        std: per-channel normalisation std (ImageNet).
        keep_source: keep the source image in the output.
        allow_missing_keys: don't raise when the key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        global_size: int = 224,
        local_size: int = 224,
        num_global: int = 2,
        num_local: int = 2,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.05, 0.4),
        prefix_global: str = "global_",
        prefix_local: str = "local_",
        global_blur_prob: float | Sequence[float] = (1.0, 0.1),
        local_blur_prob: float = 0.5,
        global_solarize_prob: float | Sequence[float] = (0.0, 0.2),
        flip_prob: float = 0.5,
        flip_axis: int = 1,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        jitter_prob: float = 0.8,
        grey_prob: float = 0.2,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        keep_source: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"MultiCropd crops one image key, got {self.keys}.")
        if int(global_size) < 1 or int(local_size) < 1:
            raise ValueError(f"global_size and local_size must be positive, got {global_size}, {local_size}.")
        if int(num_global) < 1 or int(num_local) < 0:
            raise ValueError(f"need num_global >= 1 and num_local >= 0, got {num_global}, {num_local}.")
        for name, s in (("global_scale", global_scale), ("local_scale", local_scale)):
            if len(s) != 2 or not 0 < s[0] <= s[1] <= 1:
                raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {tuple(s)}.")
        if prefix_global == prefix_local:
            raise ValueError(f"prefix_global and prefix_local must differ, got {prefix_global!r} twice.")
        if flip_axis not in (0, 1):
            raise ValueError(f"flip_axis must be 0 or 1 (a spatial axis of a 2D image), got {flip_axis}.")
        if min(brightness, contrast, saturation, hue) < 0 or hue > 0.5:
            raise ValueError(
                f"jitter strengths must be >= 0 and hue <= 0.5, got brightness={brightness}, contrast={contrast}, "
                f"saturation={saturation}, hue={hue}."
            )
        if len(blur_sigma) != 2 or not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must be (min, max) with 0 < min <= max, got {tuple(blur_sigma)}.")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each and std > 0, got {tuple(mean)}, {tuple(std)}.")
        g_blur, g_sol = (
            _probs(global_blur_prob, "global_blur_prob"),
            _probs(global_solarize_prob, "global_solarize_prob"),
        )
        _probs((local_blur_prob, flip_prob, jitter_prob, grey_prob), "local_blur_prob, flip_prob, jitter/grey_prob")
        cfg = {
            "flip_prob": float(flip_prob),
            "flip_axis": int(flip_axis),
            "brightness": float(brightness),
            "contrast": float(contrast),
            "saturation": float(saturation),
            "hue": float(hue),
            "jitter_prob": float(jitter_prob),
            "grey_prob": float(grey_prob),
            "blur_sigma": (float(blur_sigma[0]), float(blur_sigma[1])),
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
        }
        self.global_views = [
            _DinoView(int(global_size), global_scale, g_blur[i % len(g_blur)], g_sol[i % len(g_sol)], cfg)
            for i in range(int(num_global))
        ]
        self.local_views = [
            _DinoView(int(local_size), local_scale, float(local_blur_prob), 0.0, cfg) for _ in range(int(num_local))
        ]
        self.prefix_global, self.prefix_local = str(prefix_global), str(prefix_local)
        self.keep_source = bool(keep_source)
        self.set_random_state(seed=0)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> MultiCropd:
        super().set_random_state(seed, state)
        for view in (*self.global_views, *self.local_views):
            view.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        """Each view draws from the shared ``self.R`` when called."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = _rgb01(d[key], key)
            for i, view in enumerate(self.global_views):
                d[f"{self.prefix_global}{i}"] = view(img)
            for j, view in enumerate(self.local_views):
                d[f"{self.prefix_local}{j}"] = view(img)
            if not self.keep_source:
                del d[key]
        return d


class ResizeNormalized(MapTransform):
    """Deterministic evaluation / fine-tuning input: RGB, bicubic anti-aliased resize to ``size``, normalise.

    Input: channel-first 2D ``(C, H, W)`` in ``[0, 1]`` (checked as in :class:`MultiCropd`); output float32
    ``(3, size, size)`` normalised by ``mean`` and ``std`` (ImageNet). Masks take MONAI's
    ``Resized(keys="mask", spatial_size=(size, size), mode="nearest")`` instead.

    Args:
        keys: image keys.
        size: output side in pixels (224).
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        size: int = 224,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if int(size) < 1:
            raise ValueError(f"size must be positive, got {size}.")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each and std > 0, got {tuple(mean)}, {tuple(std)}.")
        self.resize = Resize((int(size), int(size)), mode="bicubic", anti_aliasing=True)
        self.normalize = NormalizeIntensity(subtrahend=list(mean), divisor=list(std), channel_wise=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = convert_to_tensor(self.resize(_rgb01(d[key], key)), track_meta=False).clamp(0, 1)
            d[key] = convert_to_tensor(self.normalize(x), dtype=torch.float32, track_meta=False).contiguous()
        return d


EIGHT_BIT_MODES = frozenset({"L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr"})
"""PIL image modes with 8 bits per channel (``meta["mode"]`` of MONAI's ``PILReader``)."""


class ScaleIntensity8Bitd(MapTransform):
    """Intensities to ``[0, 1]``: 8-bit images divided by 255, others min-max scaled.

    An image is 8-bit when MONAI's ``PILReader`` loaded it with a mode in :data:`EIGHT_BIT_MODES` (meta ``mode``):
    ``x / 255``, what the reference code's ``torchvision.transforms.ToTensor`` does to the PIL images it reads.
    Anything else (a 16-bit PNG, a DICOM X-ray, an array without meta) is min-max scaled to ``[0, 1]`` (MONAI
    ``ScaleIntensity``), our choice: the reference reads 8-bit images only. Output is float32.

    Args:
        keys: image keys.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.minmax = ScaleIntensity(minv=0.0, maxv=1.0, dtype=torch.float32)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if (getattr(img, "meta", None) or {}).get("mode") in EIGHT_BIT_MODES:
                t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
                d[key] = t.to(torch.float32) / 255.0  # a MetaTensor keeps its meta and applied operations
            else:
                d[key] = self.minmax(img)
        return d


class MIDoLInputd(MapTransform, InvertibleTransform):
    """M-IDoL's input for fine-tuning, evaluation and inference, after loading, in one place for every config:

    1. :class:`medfm.transforms.RowsFirstd` on ``keys`` (PNG/JPEG rows first, like the PIL images the reference reads;
       a single-frame DICOM also loses its frame axis), then, with ``min_size``,
       :class:`medfm.transforms.MinSpatialSized` on the image (smaller images are refused, naming the file);
    2. :class:`ScaleIntensity8Bitd` on ``image_key`` (8-bit images / 255, others min-max scaled);
    3. :class:`medfm.transforms.ToRGBd` on ``image_key`` (grey replicated to three channels, alpha dropped);
    4. MONAI ``Resized`` of ``keys`` to ``image_size`` x ``image_size`` (``mode`` per key, e.g. nearest for masks);
    5. MONAI ``NormalizeIntensityd`` of ``image_key``, per channel with ``mean`` and ``std`` (ImageNet's).

    The steps are applied in this order and inverted in reverse (``Invertd`` maps a prediction back through the
    resize and the rows-first swap to the file's grid). It is one transform, not a ``Compose``, so a
    ``CacheDataset`` caches past it.

    Args:
        keys: spatial keys: the image, and the mask if any.
        image_size: side of the square network input.
        mode: ``Resized`` interpolation, one per key or one for all.
        image_key: the image among ``keys``.
        mean: per-channel mean subtracted.
        std: per-channel standard deviation divided by.
        min_size: smallest height and width accepted (None: no check).
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_size: int,
        mode: str | Sequence[str] = "bilinear",
        image_key: str = "image",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        min_size: int | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if image_key not in self.keys:
            raise ValueError(f"image_key {image_key!r} must be one of keys {list(self.keys)}.")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}.")
        what = f"a {min_size} x {min_size} image"
        check = [] if min_size is None else [MinSpatialSized(image_key, (min_size, min_size), what)]
        self.transforms: tuple[MapTransform, ...] = (
            RowsFirstd(self.keys),
            *check,
            ScaleIntensity8Bitd(image_key),
            ToRGBd(image_key),
            Resized(self.keys, spatial_size=(image_size, image_size), mode=mode),
            NormalizeIntensityd(image_key, subtrahend=list(mean), divisor=list(std), channel_wise=True),
        )

    def _steps(self, steps: tuple[MapTransform, ...]) -> contextlib.AbstractContextManager:
        """The steps take this transform's ``allow_missing_keys`` as it is now: ``Invertd`` sets it on the
        transforms it inverts (a prediction has the image's key, not the mask's), which reaches only this one."""
        return allow_missing_keys_mode(steps) if self.allow_missing_keys else contextlib.nullcontext()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        with self._steps(self.transforms):
            for t in self.transforms:
                d = t(d)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        steps = tuple(t for t in reversed(self.transforms) if isinstance(t, InvertibleTransform))
        with self._steps(steps):
            for t in steps:
                d = t.inverse(d)
        return d
