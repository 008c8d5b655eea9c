"""Stack crops: the whole-body "scan stacks" of FratMAE (Oh et al., arXiv:2503.02824).

The paper crops 3D patches "with an increased height dimension (by a height subsampling factor of k
relative to the final training patch)" and keeps every k-th slice along that axis. Along the stack axis
a window of ``factor * roi_size[stack_axis]`` consecutive voxels is taken and every ``factor``-th voxel
of it is kept; along every other axis a plain ``roi_size`` crop is taken.

In our array order (channel-first ``(C, X, Y, Z)`` after ``Orientationd("RAS")``: X left-right,
Y posterior-anterior, Z feet-head) the paper's coronal stacks of a 160 x 160 x 192 volume are
``roi_size=(160, 32, 192), stack_axis=1, factor=2``; the axial-stack baseline is ``stack_axis=2,
factor=1`` (e.g. ``roi_size=(160, 160, 32)``).

Padding: where the image is smaller than the window along an axis, the missing voxels are filled with
``0`` placed symmetrically (as MONAI's ``SpatialPad(method="symmetric")``: the smaller half before).
The inputs are already scaled to ``[0, 1]`` with ``0`` meaning air (CT) or no uptake (PET), and ``0`` is
background for labels, so ``0`` is the right fill for every key.

Meta data: a ``MetaTensor`` stays a ``MetaTensor``; its affine is updated so that output voxel ``i``
maps to the same world point as the input voxel ``start + factor * i`` (translation by the crop start,
spacing times ``factor`` along the stack axis). The output is always a new contiguous tensor, so the
(possibly cached) source volume cannot be changed through it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, Transform

__all__ = ["StackCrop", "RandStackCrop", "RandStackCropd", "stack_crop_starts"]


def _validate(roi_size: Sequence[int], stack_axis: int, factor: int) -> tuple[tuple[int, ...], int, int]:
    if isinstance(roi_size, (int, np.integer)) or not isinstance(roi_size, Sequence) or len(roi_size) == 0:
        raise ValueError(f"roi_size must be a non-empty sequence of positive ints, got {roi_size!r}.")
    for s in roi_size:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0:
            raise ValueError(f"roi_size must hold positive ints, got {roi_size!r}.")
    if isinstance(stack_axis, bool) or not isinstance(stack_axis, (int, np.integer)):
        raise ValueError(f"stack_axis must be an int, got {stack_axis!r}.")
    if not 0 <= stack_axis < len(roi_size):
        raise ValueError(f"stack_axis must be a spatial axis index in [0, {len(roi_size) - 1}], got {stack_axis}.")
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}.")
    return tuple(int(s) for s in roi_size), int(stack_axis), int(factor)


def stack_crop_starts(
    spatial_shape: Sequence[int], window: Sequence[int], rng: np.random.RandomState | None = None
) -> tuple[int, ...]:
    """Window start per spatial axis: random (``rng`` given) or centred (``rng=None``).

    Along an axis at least as long as its window the start is uniform in ``[0, size - window]`` (random)
    or ``size // 2 - window // 2`` (centred, as MONAI's ``CenterSpatialCrop``). Along a shorter axis it is
    ``-((window - size) // 2)`` either way, i.e. the symmetric padding of MONAI's ``SpatialPad``.

    Args:
        spatial_shape: image size per spatial axis.
        window: window length per spatial axis (for the stack axis ``factor * roi_size``).
        rng: random state to draw from; ``None`` for the centred start.

    Returns:
        one start per spatial axis, negative where the window sticks out before the image.
    """
    starts = []
    for size, win in zip(spatial_shape, window):
        if size < win:
            starts.append(-((win - size) // 2))
        elif rng is None:
            starts.append(size // 2 - win // 2)
        else:
            starts.append(int(rng.randint(0, size - win + 1)))
    return tuple(starts)


class StackCrop(Transform):
    """Deterministic stack crop of a channel-first image ``(C, *spatial)``.

    Output shape ``(C, *roi_size)``: along ``stack_axis`` voxels ``start, start + factor, ...,
    start + factor * (roi_size[stack_axis] - 1)``, along the other axes ``start ... start + roi - 1``.
    Voxels outside the image are ``0`` (see the module docstring for why).

    Args:
        roi_size: final patch size per spatial axis, e.g. ``(160, 32, 192)``.
        stack_axis: spatial axis index (0-based, channel excluded) whose slices are subsampled.
        factor: keep every ``factor``-th slice of a window ``factor`` times longer (the paper's ``k``).
    """

    backend = [torch.Tensor, np.ndarray]

    def __init__(self, roi_size: Sequence[int], stack_axis: int, factor: int = 1) -> None:
        self.roi_size, self.stack_axis, self.factor = _validate(roi_size, stack_axis, factor)

    @property
    def window(self) -> tuple[int, ...]:
        """Window length per spatial axis (before subsampling)."""
        return tuple(r * (self.factor if a == self.stack_axis else 1) for a, r in enumerate(self.roi_size))

    def centred_start(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Start of the centred window for an image of ``spatial_shape``."""
        return stack_crop_starts(spatial_shape, self.window, None)

    def __call__(self, img: torch.Tensor | np.ndarray, start: Sequence[int] | None = None):
        """
        Args:
            img: channel-first image ``(C, *spatial)``, ``len(spatial) == len(roi_size)``; a
                ``MetaTensor``, a ``torch.Tensor`` or a numpy array (the output has the same type).
            start: window start per spatial axis in input voxel coordinates, may be negative or run past
                the end (those voxels are padded with 0); ``None`` gives the centred window.

        Returns:
            the crop, shape ``(C, *roi_size)``, a new contiguous array/tensor.
        """
        nd = len(self.roi_size)
        if img.ndim != nd + 1:
            raise ValueError(f"expected a channel-first image with {nd} spatial dims, got shape {tuple(img.shape)}.")
        spatial = tuple(int(s) for s in img.shape[1:])
        start = self.centred_start(spatial) if start is None else tuple(int(s) for s in start)
        if len(start) != nd:
            raise ValueError(f"start must have {nd} entries, got {start}.")
        is_numpy = isinstance(img, np.ndarray)
        data = torch.from_numpy(img) if is_numpy else (img.as_tensor() if isinstance(img, MetaTensor) else img)

        src, dst = [slice(None)], [slice(None)]
        padded = False
        for a, (size, st, roi) in enumerate(zip(spatial, start, self.roi_size)):
            step = self.factor if a == self.stack_axis else 1
            # output indices i with 0 <= st + step * i < size
            i0 = max(0, -(st // step) if st < 0 else 0)
            i1 = min(roi, (size - st + step - 1) // step) if size > st else 0
            if i1 <= i0:
                i0 = i1 = 0
            padded |= i0 > 0 or i1 < roi
            src.append(slice(st + step * i0, st + step * (i1 - 1) + 1, step) if i1 > i0 else slice(0, 0))
            dst.append(slice(i0, i1))
        view = data[tuple(src)]
        if padded:
            out = torch.zeros((data.shape[0], *self.roi_size), dtype=data.dtype, device=data.device)
            out[tuple(dst)] = view
        else:
            out = view.clone(memory_format=torch.contiguous_format)

        if is_numpy:
            return out.numpy()
        if not isinstance(img, MetaTensor):
            return out
        affine = img.affine
        sr = affine.shape[0] - 1  # spatial rank of the affine, normally == len(roi_size)
        index_map = torch.eye(sr + 1, dtype=affine.dtype)  # output voxel index -> input voxel index
        for a in range(min(sr, nd)):
            index_map[a, a] = self.factor if a == self.stack_axis else 1
            index_map[a, sr] = start[a]
        new_affine = affine @ index_map
        meta = dict(img.meta)
        meta["affine"] = new_affine
        return MetaTensor(out, meta=meta, applied_operations=list(img.applied_operations))


class RandStackCrop(StackCrop, Randomizable):
    """Stack crop at a random start (or the centred one), drawn once per call.

    Args:
        roi_size: final patch size per spatial axis.
        stack_axis: spatial axis index whose slices are subsampled.
        factor: subsampling factor ``k`` along ``stack_axis``.
        random_center: draw the start uniformly over all windows that fit; ``False`` gives the centred
            window. Along an axis shorter than the window the (symmetric-padding) start is fixed.
    """

    def __init__(self, roi_size: Sequence[int], stack_axis: int, factor: int = 1, random_center: bool = True) -> None:
        super().__init__(roi_size, stack_axis, factor)
        self.random_center = bool(random_center)
        self._start: tuple[int, ...] | None = None

    def randomize(self, spatial_shape: Sequence[int]) -> None:  # type: ignore[override]
        """Draw the window start for an image of ``spatial_shape``."""
        if len(spatial_shape) != len(self.roi_size):
            raise ValueError(f"expected {len(self.roi_size)} spatial dims, got spatial shape {tuple(spatial_shape)}.")
        rng = self.R if self.random_center else None
        self._start = stack_crop_starts([int(s) for s in spatial_shape], self.window, rng)

    @property
    def start(self) -> tuple[int, ...] | None:
        """The last drawn start (``None`` before the first draw)."""
        return self._start

    def __call__(self, img: torch.Tensor | np.ndarray, randomize: bool = True):  # type: ignore[override]
        """
        Args:
            img: channel-first image ``(C, *spatial)``.
            randomize: draw a new start; ``False`` reuses the last one (to crop several images alike).

        Returns:
            the crop, shape ``(C, *roi_size)``.
        """
        if randomize or self._start is None:
            self.randomize(img.shape[1:])
        return super().__call__(img, start=self._start)


class RandStackCropd(Randomizable, MapTransform):
    """Dictionary version of :py:class:`RandStackCrop`: one draw per call, the same crop for every key.

    All keys must share the same spatial shape (e.g. CT, PET and label on one grid).

    Args:
        keys: keys of the channel-first images ``(C, X, Y, Z)`` to crop.
        roi_size: final patch size per spatial axis, e.g. ``(160, 32, 192)`` for coronal stacks.
        stack_axis: spatial axis index (0..2) along which slices are subsampled.
        factor: subsampling factor ``k``.
        random_center: random start (``True``) or the centred window (``False``).
        allow_missing_keys: skip keys that are absent instead of raising.
    """

    backend = RandStackCrop.backend

    def __init__(
        self,
        keys: KeysCollection,
        roi_size: Sequence[int],
        stack_axis: int,
        factor: int = 1,
        random_center: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.cropper = RandStackCrop(roi_size, stack_axis, factor, random_center)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandStackCropd:
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def randomize(self, spatial_shape: Sequence[int]) -> None:  # type: ignore[override]
        self.cropper.randomize(spatial_shape)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        shapes = {k: tuple(int(s) for s in d[k].shape[1:]) for k in keys}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"RandStackCropd needs one spatial shape for all keys, got {shapes}.")
        self.randomize(shapes[keys[0]])
        for k in keys:
            d[k] = self.cropper(d[k], randomize=False)
        return d
