"""Load-time checks whose errors name the file: reading, and the smallest image a model can take."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.config import KeysCollection
from monai.transforms import LoadImaged, MapTransform

__all__ = ["LoadImageNamedd", "MinSpatialSized", "source_name"]


def source_name(img: Any, fallback: str = "<in-memory image>") -> str:
    """The file an image was loaded from (MetaTensor meta ``filename_or_obj``), for messages."""
    meta = getattr(img, "meta", None) or {}
    name = meta.get("filename_or_obj")
    return str(name) if name else fallback


class LoadImageNamedd(LoadImaged):
    """MONAI ``LoadImaged`` whose every failure is a ``ValueError`` naming the file and the problem.

    ``LoadImage`` names the file when no reader opens it, but not when the voxel data fail to decode after the
    header was read (``EOFError`` of a truncated ``.nii.gz``, ``zlib.error``, an ``ITK ERROR`` of a truncated
    DICOM). Arguments as ``LoadImaged``.
    """

    def __call__(self, data: Mapping[Hashable, Any], reader: Any = None) -> dict[Hashable, Any]:
        try:
            return super().__call__(data, reader)
        except Exception as e:
            d = dict(data)
            files = [os.fspath(d[k]) for k in self.key_iterator(d) if isinstance(d[k], (str, os.PathLike))]
            name = ", ".join(files) if files else str([k for k in self.keys])
            cause = " ".join(str(e).split())[:500]
            raise ValueError(f"{name}: cannot be read (corrupt, truncated or not an image): "
                             f"{type(e).__name__}: {cause}") from e  # fmt: skip


class MinSpatialSized(MapTransform):
    """Refuse images smaller than a model can take, up front and naming the file.

    Args:
        keys: channel-first images ``(C, *spatial)``.
        min_size: smallest size of each trailing spatial axis (e.g. ``(1, 16, 16)`` for a depth-first input whose
            in-plane patch is 16); an int applies to every spatial axis.
        what: how the requirement is described in the message.
        allow_missing_keys: don't raise for missing keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        min_size: Sequence[int] | int,
        what: str = "one patch",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_size = (int(min_size),) if isinstance(min_size, int) else tuple(int(s) for s in min_size)
        if not self.min_size or min(self.min_size) < 1:
            raise ValueError(f"min_size must be positive sizes, got {min_size!r}.")
        self.what = what

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            spatial = tuple(int(s) for s in img.shape[1:])
            need = self.min_size * len(spatial) if len(self.min_size) == 1 else self.min_size
            if len(spatial) < len(need):
                raise ValueError(
                    f"{source_name(img)}: {key!r} has spatial shape {spatial}, expected at least {len(need)} spatial "
                    f"axes (channel-first shape {tuple(int(s) for s in img.shape)})."
                )
            tail = spatial[len(spatial) - len(need):]
            if any(s < m for s, m in zip(tail, need)):
                raise ValueError(
                    f"{source_name(img)}: {key!r} of spatial shape {spatial} is smaller than {self.what}: the model "
                    f"needs at least {need} in its last {len(need)} spatial axes."
                )
        return d
