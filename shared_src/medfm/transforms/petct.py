"""Loading of paired PET/CT volumes with early, readable errors.

:py:class:`LoadPETCTd` loads the CT, the PET and (optionally) the label of one case with MONAI's
``LoadImage`` and checks them before anything else touches them: files exist and can be read, every image
is 3D single-channel, CT and PET hold only finite values, and CT/label lie on the PET's voxel grid
(same spatial shape and affine) - or are resampled onto it. Every error names the case id, the file and
the problem. The array-level checks are plain functions so other loaders can reuse them.

:py:class:`PETCTChannelsd` is the single-file path: one two-channel image (PET, CT), as MONAI Label serves
a study, checked and windowed exactly as the two-file pipeline windows PET and CT.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, NibabelReader
from monai.transforms import LoadImage, MapTransform, ResampleToMatch, ScaleIntensityRanged, Transform

__all__ = [
    "PETCTIntensityd",
    "LoadPETCTd",
    "PETCTChannelsd",
    "check_finite",
    "check_same_grid",
    "check_single_channel_3d",
    "count_nonfinite",
    "grid_mismatch",
    "resample_to_reference",
]

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def check_single_channel_3d(img: torch.Tensor | np.ndarray, name: str = "image") -> None:
    """Raise ``ValueError`` unless ``img`` is channel-first ``(1, X, Y, Z)``.

    Args:
        img: a channel-first image.
        name: how the image is called in the message (e.g. case id and file path).
    """
    shape = tuple(int(s) for s in img.shape)
    if len(shape) != 4:
        raise ValueError(f"{name}: expected a 3D image (channel-first shape (1, X, Y, Z)), got shape {shape}.")
    if shape[0] != 1:
        raise ValueError(f"{name}: expected a single-channel 3D image, got {shape[0]} channels (shape {shape}).")


def count_nonfinite(img: torch.Tensor | np.ndarray) -> int:
    """Number of NaN or +-Inf voxels in ``img`` (0 for integer arrays)."""
    t = torch.as_tensor(img)
    if not (t.is_floating_point() or t.is_complex()):
        return 0
    return int(t.numel() - torch.isfinite(t).sum().item())


def check_finite(img: torch.Tensor | np.ndarray, name: str = "image") -> None:
    """Raise ``ValueError`` if ``img`` holds NaN or +-Inf voxels; the message gives their count.

    Args:
        img: any array or tensor.
        name: how the image is called in the message.
    """
    n = count_nonfinite(img)
    if n:
        total = int(np.prod(img.shape))
        raise ValueError(f"{name}: {n} non-finite voxels (NaN or Inf) out of {total}.")


def _affine_of(img: torch.Tensor | np.ndarray, affine: torch.Tensor | np.ndarray | None) -> np.ndarray:
    if affine is None:
        if not isinstance(img, MetaTensor):
            raise ValueError("an affine is needed: pass a MetaTensor or the affine explicitly.")
        affine = img.affine
    return np.asarray(torch.as_tensor(affine).detach().cpu().numpy(), dtype=np.float64)


def grid_mismatch(
    img: torch.Tensor | np.ndarray,
    ref: torch.Tensor | np.ndarray,
    atol: float = 1e-3,
    img_affine: torch.Tensor | np.ndarray | None = None,
    ref_affine: torch.Tensor | np.ndarray | None = None,
) -> str | None:
    """Describe how the voxel grid of ``img`` differs from that of ``ref``; ``None`` when they match.

    Args:
        img: channel-first image ``(C, *spatial)``; its affine is ``img_affine`` or ``img.affine``.
        ref: channel-first reference image ``(C, *spatial)``.
        atol: absolute tolerance on every affine entry (mm).
        img_affine: optional ``(4, 4)`` affine of ``img``.
        ref_affine: optional ``(4, 4)`` affine of ``ref``.

    Returns:
        ``"shape mismatch: ..."`` or ``"affine mismatch: ..."`` with both values, or ``None``.
    """
    shape, ref_shape = tuple(int(s) for s in img.shape[1:]), tuple(int(s) for s in ref.shape[1:])
    if shape != ref_shape:
        return f"shape mismatch: spatial shape {shape} vs reference {ref_shape}"
    a, b = _affine_of(img, img_affine), _affine_of(ref, ref_affine)
    if a.shape != b.shape or not np.allclose(a, b, rtol=0.0, atol=atol):
        with np.printoptions(precision=4, suppress=True):
            return f"affine mismatch (atol={atol}): affine\n{a}\nvs reference affine\n{b}"
    return None


def check_same_grid(
    img: torch.Tensor | np.ndarray,
    ref: torch.Tensor | np.ndarray,
    atol: float = 1e-3,
    name: str = "image",
    ref_name: str = "reference",
) -> None:
    """Raise ``ValueError`` unless ``img`` and ``ref`` (``MetaTensor``) share spatial shape and affine.

    Args:
        img: channel-first ``MetaTensor`` ``(C, *spatial)``.
        ref: channel-first reference ``MetaTensor``.
        atol: absolute tolerance on the affine entries.
        name: how ``img`` is called in the message.
        ref_name: how ``ref`` is called in the message.
    """
    problem = grid_mismatch(img, ref, atol)
    if problem is not None:
        raise ValueError(f"{name} is not on the grid of {ref_name}: {problem}")


def resample_to_reference(img: MetaTensor, ref: MetaTensor, mode: str = "bilinear", pad_value: float = 0.0):
    """Resample ``img`` onto the voxel grid of ``ref`` (MONAI ``ResampleToMatch``).

    Points outside ``img`` get ``pad_value`` (bilinear: ``img - pad_value`` is resampled with zero padding
    and ``pad_value`` added back, which is exact since interpolation weights sum to one). The output has
    ``ref``'s spatial shape and affine and ``img``'s dtype.

    Args:
        img: channel-first ``MetaTensor`` ``(C, X, Y, Z)``.
        ref: channel-first reference ``MetaTensor`` ``(C', X', Y', Z')``.
        mode: ``"bilinear"`` for images, ``"nearest"`` for labels.
        pad_value: value outside the field of view of ``img`` (e.g. ``-1000`` HU for CT).

    Returns:
        ``MetaTensor`` ``(C, X', Y', Z')``.
    """
    dtype = img.dtype
    src = img.to(torch.float32)
    if pad_value:
        src = src - pad_value
    out = ResampleToMatch(mode=mode, padding_mode="zeros", dtype=torch.float32)(src, ref)
    if pad_value:
        out = out + pad_value
    return out.to(dtype)


class LoadPETCTd(MapTransform):
    """Load one PET/CT case (CT, PET and optional label) and check it.

    Each file is read with ``LoadImage(image_only=True, ensure_channel_first=True)`` (``NibabelReader``
    for ``.nii``/``.nii.gz``, MONAI's choice otherwise): images become float32 ``MetaTensor`` ``(1, X, Y,
    Z)``, the label keeps its stored dtype. Checks, in order, each raising with the case id, file and
    problem: the file exists (``FileNotFoundError``) and can be read, the image is 3D single-channel, CT
    and PET (all of ``keys``) are finite, and every other key and the label share the grid of
    ``reference_key``. With ``grid_mismatch="resample"`` mismatching images are instead resampled onto the
    reference grid (bilinear, padded with the image's minimum, i.e. air for CT) and the label with nearest
    neighbour (padded with 0, its dtype kept).

    Args:
        keys: image keys, CT and PET.
        reference_key: key (in ``keys``) whose grid the others must match, the PET.
        label_key: key of the label, or ``None`` for no label.
        case_key: key of the case id used in error messages.
        grid_mismatch: ``"error"`` to raise on a grid mismatch, ``"resample"`` to resample onto the reference.
        affine_atol: absolute tolerance on affine entries (mm) when comparing grids.
        allow_missing_label: a data dict without ``label_key`` (or with ``None`` there) is fine; otherwise
            it raises. A label path that does not exist always raises.
    """

    def __init__(
        self,
        keys: KeysCollection = ("ct", "pet"),
        reference_key: str = "pet",
        label_key: str | None = "label",
        case_key: str = "case",
        grid_mismatch: Literal["error", "resample"] = "error",
        affine_atol: float = 1e-3,
        allow_missing_label: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys=False)
        if reference_key not in self.keys:
            raise ValueError(f"reference_key {reference_key!r} must be one of keys {self.keys}.")
        if label_key is not None and label_key in self.keys:
            raise ValueError(f"label_key {label_key!r} must not be one of the image keys {self.keys}.")
        if grid_mismatch not in ("error", "resample"):
            raise ValueError(f"grid_mismatch must be 'error' or 'resample', got {grid_mismatch!r}.")
        if not np.isfinite(affine_atol) or affine_atol < 0:
            raise ValueError(f"affine_atol must be a finite number >= 0, got {affine_atol!r}.")
        self.reference_key = reference_key
        self.label_key = label_key
        self.case_key = case_key
        self.grid_mismatch = grid_mismatch
        self.affine_atol = float(affine_atol)
        self.allow_missing_label = bool(allow_missing_label)
        kw = {"image_only": True, "ensure_channel_first": True}
        self._image_loader = LoadImage(dtype=np.float32, **kw)
        self._label_loader = LoadImage(dtype=None, **kw)
        # passed at call time so that LoadImage uses it alone: a reader given to LoadImage's constructor is
        # only tried first, and on failure other readers (ITK) may return garbage for a truncated file
        self._nifti_reader = NibabelReader()

    def _load(self, path: object, key: Hashable, case: str, is_label: bool) -> MetaTensor:
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"case {case!r}: {key} must be a file path, got {type(path).__name__}: {path!r}.")
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"case {case!r}: {key} file {path} does not exist.")
        loader = self._label_loader if is_label else self._image_loader
        reader = self._nifti_reader if path.lower().endswith(_NIFTI_SUFFIXES) else None
        try:
            img = loader(path, reader=reader)
        except Exception as e:
            cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(
                f"case {case!r}: {key} file {path} cannot be read (corrupt or not a supported image): "
                f"{type(e).__name__}: {cause}"
            ) from e
        check_single_channel_3d(img, f"case {case!r}: {key} file {path}")
        return img

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        case = str(d.get(self.case_key, "<unknown case>"))
        paths: dict[Hashable, object] = {}
        for key in self.keys:
            if d.get(key) is None:
                raise ValueError(f"case {case!r}: no {key} file given (key {key!r} missing or None).")
            paths[key] = d[key]
        if self.label_key is not None:
            if d.get(self.label_key) is not None:
                paths[self.label_key] = d[self.label_key]
            elif not self.allow_missing_label:
                raise ValueError(f"case {case!r}: no {self.label_key} file given and allow_missing_label=False.")

        loaded = {k: self._load(p, k, case, is_label=(k == self.label_key)) for k, p in paths.items()}
        for key in self.keys:
            check_finite(loaded[key], f"case {case!r}: {key} file {paths[key]}")

        ref = loaded[self.reference_key]
        ref_name = f"{self.reference_key} file {paths[self.reference_key]}"
        for key, img in loaded.items():
            if key == self.reference_key:
                continue
            problem = grid_mismatch(img, ref, self.affine_atol)
            if problem is None:
                continue
            if self.grid_mismatch == "error":
                raise ValueError(
                    f"case {case!r}: {key} file {paths[key]} is not on the grid of {ref_name}: {problem}\n"
                    "(use grid_mismatch='resample' to resample it onto the reference grid)"
                )
            if key == self.label_key:
                loaded[key] = resample_to_reference(img, ref, mode="nearest", pad_value=0.0)
            else:
                loaded[key] = resample_to_reference(img, ref, mode="bilinear", pad_value=float(img.min()))
        d.update(loaded)
        return d


def _window(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``(x - lo) / (hi - lo)`` clipped to ``[0, 1]`` (MONAI ``ScaleIntensityRange`` with ``clip=True``)."""
    return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)


class PETCTChannelsd(MapTransform):
    """Check and window a stacked PET/CT image: channel 0 PET (SUV), channel 1 CT (HU), one voxel grid.

    The image under each key must be channel-first ``(2, X, Y, Z)`` with finite values (a 4D NIfTI
    ``(X, Y, Z, 2)`` loaded with ``ensure_channel_first=True``, as ``tools/petct_studies.py`` writes them).
    PET becomes ``SUV / pet_suv_max`` and CT ``(HU - ct_window[0]) / (ct_window[1] - ct_window[0])``, both
    clipped to ``[0, 1]``: the values FratMAE's two-file pipeline (:class:`LoadPETCTd` +
    ``ScaleIntensityRanged`` + ``ConcatItemsd``) gives. The output is float32 with the input's metadata.
    With ``label_key``, the label must be ``(1, X, Y, Z)`` on the image's grid. Errors name the file.

    Args:
        keys: keys of stacked PET/CT images.
        pet_suv_max: SUV mapped to 1.
        ct_window: HU range mapped to ``[0, 1]``.
        label_key: key of a label to check against the (first) image's grid, or ``None``.
        affine_atol: absolute tolerance on affine entries (mm) for the label check.
        allow_missing_keys: skip absent keys instead of raising.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        pet_suv_max: float = 20.0,
        ct_window: tuple[float, float] = (-1000.0, 1000.0),
        label_key: str | None = None,
        affine_atol: float = 1e-3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not pet_suv_max > 0:
            raise ValueError(f"pet_suv_max must be positive, got {pet_suv_max!r}.")
        lo, hi = (float(v) for v in ct_window)
        if not hi > lo:
            raise ValueError(f"ct_window must be (low, high) with high > low, got {tuple(ct_window)}.")
        self.pet_suv_max = float(pet_suv_max)
        self.ct_window = (lo, hi)
        self.label_key = label_key
        self.affine_atol = float(affine_atol)

    @staticmethod
    def _name(img: object, key: Hashable) -> str:
        src = img.meta.get("filename_or_obj") if isinstance(img, MetaTensor) else None
        return f"{key} file {src}" if src else f"{key}"

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        first = None
        for key in self.key_iterator(d):
            img = d[key]
            name = self._name(img, key)
            shape = tuple(int(s) for s in img.shape)
            if len(shape) != 4 or shape[0] != 2:
                raise ValueError(
                    f"{name}: expected a stacked PET/CT image, channel-first (2, X, Y, Z) with PET (SUV) in "
                    f"channel 0 and CT (HU) in channel 1, got shape {shape}. tools/petct_studies.py writes such "
                    "files from separate PET and CT volumes."
                )
            check_finite(img, name)
            out = img.to(torch.float32).clone()  # clone keeps a MetaTensor's metadata
            out[0] = _window(out[0], 0.0, self.pet_suv_max)
            out[1] = _window(out[1], *self.ct_window)
            d[key] = out
            first = first if first is not None else (out, name)
        if self.label_key is not None and d.get(self.label_key) is not None and first is not None:
            label, ref = d[self.label_key], first[0]
            lname = self._name(label, self.label_key)
            check_single_channel_3d(label, lname)
            problem = grid_mismatch(label, ref, self.affine_atol)
            if problem is not None:
                raise ValueError(f"{lname} is not on the grid of {first[1]}: {problem}")
        return d


class PETCTIntensityd(Transform):
    """FratMAE's intensity scaling of a PET/CT pair: the CT window and the PET SUV range, each clipped to ``[0, 1]``.

    The same as ``ScaleIntensityRanged(ct_key, a_min=ct_window[0], a_max=ct_window[1], b_min=0, b_max=1,
    clip=True)`` followed by ``ScaleIntensityRanged(pet_key, a_min=0, a_max=pet_suv_max, b_min=0, b_max=1,
    clip=True)``, as the pre-training, fine-tuning and inference configs used to write out.

    Args:
        ct_window: ``[low, high]`` CT window in Hounsfield units.
        pet_suv_max: SUV that maps to 1.
        ct_key: key of the CT volume.
        pet_key: key of the PET volume.

    Raises:
        ValueError: ``ct_window`` is not two increasing values, or ``pet_suv_max`` is not positive.
    """

    def __init__(
        self, ct_window: Sequence[float], pet_suv_max: float, ct_key: Hashable = "ct", pet_key: Hashable = "pet"
    ) -> None:
        if len(ct_window) != 2 or not ct_window[0] < ct_window[1]:
            raise ValueError(f"ct_window must be [low, high] with low < high, got {ct_window}.")
        if not pet_suv_max > 0:
            raise ValueError(f"pet_suv_max must be positive, got {pet_suv_max}.")
        # kept as plain attributes too, so the cache hash of a pipeline holding this step sees them
        self.ct_window, self.pet_suv_max = tuple(ct_window), pet_suv_max
        self.ct = ScaleIntensityRanged(keys=ct_key, a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0,
                                       clip=True)  # fmt: skip
        self.pet = ScaleIntensityRanged(keys=pet_key, a_min=0.0, a_max=pet_suv_max, b_min=0.0, b_max=1.0, clip=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Scale ``data[ct_key]`` and ``data[pet_key]`` (arrays of any shape); other keys pass through."""
        return self.pet(self.ct(data))
