"""Present 2D image files rows first, as PIL, NumPy and pydicom show them (and as the models' authors load them).

MONAI's readers index a 2D file by ``(x, y)`` = ``(column, row)``: ``PILReader`` returns ``(W, H)`` unless
``reverse_indexing=False``, and ``ITKReader`` returns a single-frame DICOM as ``(W, H, 1)``. Models pre-trained by
code that reads images with PIL or pydicom (``np.asarray(Image.open(f))``, ``pixel_array``: ``(rows, columns)``)
see the transpose of that. :class:`RowsFirstd`, placed right after ``LoadImaged(..., ensure_channel_first=True)``,
turns such an array into ``(C, H, W)`` and permutes the affine with it, so every pixel keeps its world
coordinates; it is invertible, so ``Invertd`` on a prediction gives back MONAI's ``(C, W, H)`` grid and MONAI's
writers store the prediction in the input's orientation.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform
from monai.utils import TraceKeys

__all__ = ["NoChannelMetad", "RowsFirstd", "is_planar_file"]

_DICOM_ROWS_TAG = "0028|0010"


def _filename(img: Any) -> str:
    meta = getattr(img, "meta", None) or {}
    return str(meta.get("filename_or_obj") or "")


def is_planar_file(img: Any) -> bool:
    """Whether a channel-first image as MONAI loaded it is a 2D file: two spatial axes, or a single-frame DICOM
    ``(C, W, H, 1)`` (``.dcm`` file name or DICOM tags in its meta). Volumes, single-slice NIfTI included, are not."""
    spatial = tuple(int(n) for n in img.shape[1:])
    if len(spatial) == 2:
        return True
    meta = getattr(img, "meta", None) or {}
    dicom = _filename(img).lower().endswith(".dcm") or _DICOM_ROWS_TAG in meta
    return len(spatial) == 3 and spatial[2] == 1 and dicom


def _swap_affine() -> torch.Tensor:
    """``P`` (4, 4) with ``affine_out = affine_in @ P``: spatial axes 0 and 1 exchanged."""
    p = torch.eye(4, dtype=torch.float64)
    p[[0, 1]] = p[[1, 0]]
    return p


class RowsFirstd(MapTransform, InvertibleTransform):
    """MONAI-loaded 2D images to rows first: ``(C, W, H)`` or single-frame DICOM ``(C, W, H, 1)`` -> ``(C, H, W)``.

    ``out[c, i, j]`` is the pixel in row ``i`` and column ``j`` of the file, i.e. ``np.asarray(PIL.Image.open(f))``
    or pydicom's ``pixel_array`` at ``[i, j]``. The affine is permuted with the array (the DICOM's 4x4 affine keeps
    its third column for the dropped frame axis). Inputs that are not 2D files (:func:`is_planar_file`: volumes,
    single-slice NIfTI) pass unchanged, so the transform can sit in a pipeline that mixes 2D and 3D inputs.
    :meth:`inverse` restores the loaded shape and affine exactly (e.g. through ``Invertd`` on a prediction).

    Args:
        keys: keys of the channel-first images (MetaTensors from ``LoadImaged(..., ensure_channel_first=True)``).
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def _forward(self, img: Any, key: Hashable) -> Any:
        if not isinstance(img, torch.Tensor):
            img = torch.as_tensor(np.asarray(img))
        if img.ndim not in (3, 4):
            raise ValueError(
                f"{_filename(img) or '<in-memory image>'}: {key!r} must be channel-first (C, W, H) or (C, X, Y, Z), "
                f"got shape {tuple(img.shape)}."
            )
        if not is_planar_file(img):
            return img
        dropped = img.ndim == 4
        orig_size = tuple(int(n) for n in img.shape[1:])
        out = (img[..., 0] if dropped else img).transpose(1, 2).contiguous()
        if isinstance(out, MetaTensor):
            self.push_transform(out, affine=_swap_affine(), extra_info={"dropped_frame": dropped}, orig_size=orig_size)
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._forward(d[key], key)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not isinstance(img, MetaTensor) or not img.applied_operations:
                continue
            if img.applied_operations[-1].get(TraceKeys.CLASS_NAME) != type(self).__name__:
                continue  # an input this transform passed unchanged
            info = self.pop_transform(img)[TraceKeys.EXTRA_INFO]
            affine = img.affine.to(torch.float64) @ _swap_affine()  # the swap is its own inverse
            out = img.transpose(1, 2).contiguous()
            if info["dropped_frame"]:
                out = out.unsqueeze(-1)
            out.affine = affine
            d[key] = out
        return d


class NoChannelMetad(MapTransform):
    """Mark images as coming from a file without a channel axis (``meta["original_channel_dim"] = NaN``, what MONAI's
    readers write for a grey image).

    A label map predicted for an RGB PNG inherits the PNG's ``original_channel_dim = -1`` (through ``Invertd``),
    and MONAI 1.6's NIfTI and ITK writers then fail to save it (``SaveImage cannot find a suitable writer``); marked
    like a grey image's prediction, it is saved like one. Place it right before ``SaveImaged``.

    Args:
        keys: channel-first MetaTensors (the predictions).
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                d[key].meta["original_channel_dim"] = float("nan")
        return d
