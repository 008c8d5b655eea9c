"""A crop-friendly on-disk cache for native-resolution fine-tuning (:class:`CropCacheDataset`).

``PersistentDataset`` pickles each case after its deterministic transforms and unpickles the whole case for every
sample, and ``RandCropByPosNegLabeld`` then recomputes the foreground and background indices over the full
volume. :class:`CropCacheDataset` runs the same deterministic transforms once per case and stores every array
in chunks (:mod:`medfm.data.chunked`: about a quarter of the crop per spatial axis; a chunk that compresses, such as
the zeros outside the body, is stored compressed, one that does not, raw), so a random crop reads only the chunks it
touches:

- intensities in ``[0, 1]`` (the bundles' ``ScaleIntensityRanged(clip=True)``) are stored as 16-bit fixed point
  (``round(x * 65535)``, error at most 7.7e-6, two bytes per voxel instead of four); other floating arrays as
  float32; integer-valued labels in ``[0, 255]`` as uint8;
- for ``RandCropByPosNegLabeld``, the voxels it may centre a crop on (foreground; background above its
  ``image_threshold``) are computed once, with MONAI's own ``map_binary_to_indices`` on the unrounded arrays, and
  stored as two bit masks (an eighth of a byte per voxel before compression, one chunk per first-axis plane) with
  their cumulative counts per plane. The ``k``-th candidate is then found from the counts and one plane of a mask,
  so a sample draws the same centres from the same random state as MONAI's transform with full index arrays;
- the cache is keyed by the data item and by ``hash_transform`` of the deterministic transforms, so a change of the
  preprocessing writes a new cache instead of reading a stale one.

With ``RandCropByPosNegLabeld`` as the first random transform, a sample equals what ``PersistentDataset`` with the
same transforms and random state gives (the image within the 16-bit rounding, the label exactly). With any other
random transform first, the arrays are read whole and the random transforms run on them unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, RandCropByPosNegLabeld, RandomizableTrait, Transform, apply_transform
from monai.transforms.utils import generate_pos_neg_label_crop_centers, map_binary_to_indices
from monai.utils import fall_back_tuple

from .chunked import ChunkedArray, save_chunked

__all__ = ["CropCacheDataset"]

_FIXED_POINT = 65535.0
_FORMAT = "chunked-zlib-v1"  # part of the cache key: another storage format never reads this one's files


def _chunk(shape: Sequence[int], roi: Sequence[int] | None) -> tuple[int, ...]:
    """Chunk shape of a channel-first array: every channel; per spatial axis a quarter of the crop's size within
    [8, 64] (a crop then reads at most about 1.25x its voxels along each axis), or 32 without a crop."""
    spatial = len(shape) - 1
    if roi is None:
        return (shape[0], *(32,) * spatial)
    roi = fall_back_tuple(roi, shape[1:])
    return (shape[0], *(int(min(64, max(8, r // 4))) for r in roi))


def _split(transform: Compose) -> tuple[Compose, list[Callable]]:
    """The deterministic prefix (up to the first random transform, as ``PersistentDataset`` caches) and the rest."""
    ts = list(transform.transforms)
    first = next((n for n, t in enumerate(ts) if isinstance(t, RandomizableTrait) or not isinstance(t, Transform)),
                 len(ts))  # fmt: skip
    return Compose(ts[:first]), ts[first:]


def _encode(key: Hashable, arr: np.ndarray, label_keys: Sequence[Hashable]) -> tuple[np.ndarray, str]:
    """Stored array and its encoding (``fixed16``, ``uint8`` or ``raw``)."""
    if key in label_keys and arr.size and np.all(arr == np.round(arr)) and arr.min() >= 0 and arr.max() <= 255:
        return arr.astype(np.uint8), "uint8"
    if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        return np.round(arr.astype(np.float64) * _FIXED_POINT).astype(np.uint16), "fixed16"
    return (arr.astype(np.float32) if np.issubdtype(arr.dtype, np.floating) else arr), "raw"


def _decode(stored: np.ndarray, encoding: str, dtype: str) -> np.ndarray:
    stored = np.asarray(stored)
    if encoding == "fixed16":
        return (stored.astype(np.float32) / np.float32(_FIXED_POINT)).astype(dtype)
    return np.asarray(stored).astype(dtype, copy=False)


class _KthIndex:
    """The flat (C-order, spatial) indices of a mask, found on demand: ``len`` and ``[k]`` like MONAI's index arrays.

    Not a ``Sequence`` subclass, so ``generate_pos_neg_label_crop_centers`` uses it as given.
    """

    def __init__(self, cumulative: np.ndarray, plane: Callable[[int], np.ndarray]):  # plane x: its (Y, Z, ...) mask
        self.cumulative, self.plane = cumulative, plane

    def __len__(self) -> int:
        return int(self.cumulative[-1]) if self.cumulative.size else 0

    def __getitem__(self, k: int) -> int:
        x = int(np.searchsorted(self.cumulative, k, side="right"))
        before = int(self.cumulative[x - 1]) if x else 0
        mask = self.plane(x).ravel()
        return x * mask.size + int(np.flatnonzero(mask)[k - before])


class CropCacheDataset(torch.utils.data.Dataset):
    """Dataset whose deterministic preprocessing is cached once per case as chunk-compressed arrays (module doc).

    Args:
        data: the data items (dicts of file paths and values).
        transform: a ``Compose``: deterministic transforms, then random ones (the split ``PersistentDataset`` uses).
        cache_dir: folder of the cache; one sub-folder per case and preprocessing.
        hash_transform: function of the deterministic ``Compose`` giving bytes that change with its settings
            (e.g. :func:`medfm.data.transform_state_hash`); ``None`` keys on the data item only.
        label_keys: keys stored as uint8 when integer-valued in ``[0, 255]``.

    Raises:
        ValueError: ``transform`` is not a ``Compose``, or a case's deterministic output is not a dict.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Compose,
        cache_dir: str,
        hash_transform: Callable[[Any], bytes] | None = None,
        label_keys: Sequence[Hashable] = ("label",),
    ):
        if not isinstance(transform, Compose):
            raise ValueError(f"CropCacheDataset needs a Compose transform, got {type(transform).__name__}.")
        self.data, self.transform, self.cache_dir = list(data), transform, str(cache_dir)
        self.label_keys = tuple(label_keys)
        self._prefix, self._random = _split(transform)
        first = self._random[0] if self._random else None
        self._crop = first if type(first) is RandCropByPosNegLabeld else None
        prep = (hash_transform(self._prefix) if hash_transform else b"").decode("utf-8", "replace") + f"|{_FORMAT}"
        if self._crop is not None:  # the stored masks depend on these
            prep += f"|{self._crop.label_key}|{self._crop.image_key}|{self._crop.cropper.image_threshold!r}"
        self._prep = prep

    def __len__(self) -> int:
        return len(self.data)

    def _case_dir(self, item: Mapping[str, Any]) -> str:
        key = json.dumps(item, sort_keys=True, default=str) + "\x00" + self._prep
        return os.path.join(self.cache_dir, hashlib.md5(key.encode("utf-8")).hexdigest())

    def _write(self, item: Mapping[str, Any], folder: str) -> None:
        out = self._prefix(dict(item))
        if not isinstance(out, Mapping):
            raise ValueError(f"CropCacheDataset: the deterministic transforms of {item} must give one dict, got "
                             f"{type(out).__name__} (a transform giving several samples must come later).")  # fmt: skip
        os.makedirs(self.cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=self.cache_dir, prefix=".tmp_")
        try:
            arrays, rest = {}, {}
            for k, v in out.items():
                if isinstance(v, (torch.Tensor, np.ndarray)) and np.ndim(v) >= 2:
                    arr = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                    stored, enc = _encode(k, arr, self.label_keys)
                    roi = self._crop.cropper.spatial_size if self._crop is not None else None
                    save_chunked(os.path.join(tmp, f"{len(arrays)}.zc"), stored, _chunk(stored.shape, roi))
                    arrays[k] = {"file": f"{len(arrays)}.zc", "encoding": enc, "dtype": str(arr.dtype),
                                 "meta": dict(v.meta) if isinstance(v, MetaTensor) else None}  # fmt: skip
                else:
                    rest[k] = v
            if self._crop is not None and self._crop.label_key in out:
                self._write_masks(out, tmp)
            torch.save({"arrays": arrays, "rest": rest}, os.path.join(tmp, "case.pt"))
            try:
                os.replace(tmp, folder)
            except OSError:  # another process wrote the same case first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def __getitem__(self, index: int) -> Any:
        folder = self._case_dir(self.data[index])
        if not os.path.isfile(os.path.join(folder, "case.pt")):
            self._write(self.data[index], folder)
        case = torch.load(os.path.join(folder, "case.pt"), weights_only=False)
        rest, infos = case["rest"], case["arrays"]
        stored = {k: ChunkedArray(os.path.join(folder, a["file"])) for k, a in infos.items()}
        if self._crop is not None and self._crop.label_key in stored:
            samples: Any = self._crop_samples(rest, stored, infos, folder)
            remaining = self._random[1:]
        else:
            samples = {**rest, **{k: self._tensor(k, m, infos[k]) for k, m in stored.items()}}
            remaining = self._random
        for t in remaining:  # as Compose applies them (a new Compose would reseed the transforms' random states)
            samples = apply_transform(t, samples, map_items=True)
        return samples

    def _tensor(self, key: Hashable, stored: np.ndarray, info: Mapping[str, Any], start: Sequence[int] = ()):
        arr = torch.from_numpy(np.ascontiguousarray(_decode(stored, info["encoding"], info["dtype"])))
        if info["meta"] is None:
            return arr
        meta = dict(info["meta"])
        if start and "affine" in meta:
            affine = torch.as_tensor(meta["affine"], dtype=torch.float64).clone()
            affine[: len(start), -1] += affine[: len(start), : len(start)] @ torch.tensor(start, dtype=torch.float64)
            meta["affine"] = affine
        return MetaTensor(arr, meta=meta)

    def _write_masks(self, out: Mapping[Hashable, Any], folder: str) -> None:
        """Bit masks of the crop's foreground and background candidates, and their cumulative counts per plane."""
        crop = self._crop
        label = out[crop.label_key]
        image = out.get(crop.image_key) if crop.image_key is not None else None
        shape = tuple(label.shape[1:])
        for name, idx in zip(("fg", "bg"), map_binary_to_indices(label, image, crop.cropper.image_threshold)):
            mask = np.zeros(int(np.prod(shape)), bool)
            mask[np.asarray(idx, dtype=np.int64)] = True
            mask = mask.reshape(shape)
            bits = np.packbits(mask, axis=-1)
            save_chunked(os.path.join(folder, f"{name}_bits.zc"), bits, (1, *bits.shape[1:]))
            np.save(os.path.join(folder, f"{name}_counts.npy"), np.cumsum(mask.reshape(shape[0], -1).sum(1)))

    def _crop_samples(self, rest: dict, stored: dict, infos: dict, folder: str) -> list[dict]:
        """``RandCropByPosNegLabeld`` on the stored arrays: the same centres from its random state, then slices."""
        crop = self._crop
        shape = stored[crop.label_key].shape[1:]

        def candidates(name: str) -> _KthIndex:
            bits = ChunkedArray(os.path.join(folder, f"{name}_bits.zc"))
            counts = np.load(os.path.join(folder, f"{name}_counts.npy"))
            return _KthIndex(counts, lambda x: np.unpackbits(np.asarray(bits[x]), axis=-1, count=shape[-1]))

        size = fall_back_tuple(crop.cropper.spatial_size, shape)
        centers = generate_pos_neg_label_crop_centers(
            size, crop.cropper.num_samples, crop.cropper.pos_ratio, shape, candidates("fg"), candidates("bg"),
            crop.cropper.R, crop.cropper.allow_smaller,
        )  # fmt: skip
        size = tuple(min(s, n) for s, n in zip(size, shape)) if crop.cropper.allow_smaller else size
        samples = []
        for center in centers:
            start = [max(int(c) - s // 2, 0) for c, s in zip(center, size)]
            sl = (slice(None), *(slice(b, b + s) for b, s in zip(start, size)))
            sample = dict(rest)
            for k, m in stored.items():
                sample[k] = self._tensor(k, m[sl], infos[k], start) if k in crop.keys else self._tensor(k, m, infos[k])
            samples.append(sample)
        return samples
