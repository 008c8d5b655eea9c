"""Pan-FM organ loading and the test-time missing-organ protocol (dictionary transforms on subject items).

Pan-FM (Wu et al., `arXiv:2605.07055 <https://arxiv.org/abs/2605.07055>`_) takes up to seven organ volumes
per subject (:data:`medfm.organs.PANFM_ORGANS`), each on its own grid. The items come from
:func:`medfm.data.panfm.read_subject_table` (``subject``, one path or ``None`` per organ, ``present``,
optional ``labels``).

- :class:`LoadOrgansd` loads every present organ, resizes it to that organ's fixed shape, scales its intensity
  and writes ``image_<organ>`` ``(1, *organ_shape)`` float32 (zeros for a missing organ) and ``present``
  ``(n_organs,)`` bool, so that a batch holds one ``(B, 1, *organ_shape)`` tensor per organ.
- :class:`DropOrgansd` is the robustness protocol: leave one organ out for every subject, or drop each
  present organ with probability ``rate``, the same organs for a subject in every run and for every model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.data import NibabelReader
from monai.transforms import LoadImage, Resize, Transform

from medfm.organs import PANFM_ORGANS as ORGANS

from .petct import check_single_channel_3d

__all__ = ["SUPPORTED_DROP_MODES", "SUPPORTED_ORGAN_INTENSITY", "DropOrgansd", "LoadOrgansd", "organ_drop_draws"]

SUPPORTED_ORGAN_INTENSITY = ("percentile", "zscore")
"""``"percentile"``: 0.5-99.5 percentiles -> ``[0, 1]``, clipped; ``"zscore"``: zero mean, unit variance."""
SUPPORTED_DROP_MODES = ("none", "leave_out", "random")

_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _subject(d: Mapping[Hashable, Any], key: str) -> str:
    return str(d.get(key, "<unknown subject>"))


def _present_mask(d: Mapping[Hashable, Any], key: str, n: int, subject: str) -> torch.Tensor | None:
    """``d[key]`` as a ``(n,)`` bool tensor, ``None`` when absent."""
    if d.get(key) is None:
        return None
    mask = torch.as_tensor(d[key]).to(torch.bool).flatten().clone()
    if mask.numel() != n:
        raise ValueError(f"subject {subject!r}: {key!r} has {mask.numel()} entries, expected one per organ ({n}).")
    return mask


class LoadOrgansd(Transform):
    """Load, resize and normalise every organ of one subject into fixed per-organ tensors.

    For each organ of ``organs``: when present, its NIfTI (or any MONAI-readable) file is loaded channel-first
    with ``LoadImage`` (NibabelReader for ``.nii``/``.nii.gz``), checked (3D single-channel, finite), scaled
    (``intensity``, on the native voxels) and resized to ``organ_shapes[organ]`` (MONAI ``Resize``,
    trilinear); when missing, zeros of that shape. Outputs (plain tensors, so a batch collates):

    - ``<image_prefix><organ>``: float32 ``(1, *organ_shapes[organ])``;
    - ``present``: bool ``(len(organs),)`` in ``organs`` order;
    - ``labels``: float32 ``(K,)`` when the item has labels;
    - the organ path keys: a missing organ's ``None`` becomes ``""`` (``None`` does not collate).

    An organ is present when its path is given and, if the item has ``present``, that flag is True (a False
    flag skips a given path). Errors name the subject, organ and file: ``FileNotFoundError`` for a path that
    does not exist, ``TypeError`` for a path that is not a string, ``ValueError`` for an unreadable file, a
    non-3D or multi-channel image, NaN/Inf, or a ``present`` flag without a path.

    Args:
        organs: organ keys, in the order of ``present``.
        organ_shapes: ``{organ: (D, H, W)}`` target shape of every organ (keyword-only, required).
        intensity: one of :data:`SUPPORTED_ORGAN_INTENSITY`.
        image_prefix: output key prefix.
        subject_key: key of the subject id (error messages).
        present_key: key of the presence mask (read when in the item, always written).
        labels_key: key of the labels.
        lower: lower percentile for ``"percentile"``.
        upper: upper percentile for ``"percentile"``.
    """

    def __init__(
        self,
        organs: Sequence[str] = ORGANS,
        *,
        organ_shapes: Mapping[str, Sequence[int]],
        intensity: Literal["percentile", "zscore"] = "percentile",
        image_prefix: str = "image_",
        subject_key: str = "subject",
        present_key: str = "present",
        labels_key: str = "labels",
        lower: float = 0.5,
        upper: float = 99.5,
    ) -> None:
        self.organs = tuple(organs)
        if not self.organs or len(set(self.organs)) != len(self.organs):
            raise ValueError(f"organs must be distinct names, got {self.organs}.")
        shapes = {}
        for organ in self.organs:
            shape = (organ_shapes or {}).get(organ)
            if shape is None or len(shape) != 3 or min(int(n) for n in shape) < 1:
                raise ValueError(f"organ_shapes[{organ!r}] must be three positive sizes (D, H, W), got {shape!r}.")
            shapes[organ] = tuple(int(n) for n in shape)
        self.organ_shapes = shapes
        if intensity not in SUPPORTED_ORGAN_INTENSITY:
            raise ValueError(f"intensity must be one of {SUPPORTED_ORGAN_INTENSITY}, got {intensity!r}.")
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"need 0 <= lower < upper <= 100, got lower={lower}, upper={upper}.")
        self.intensity, self.lower, self.upper = intensity, float(lower), float(upper)
        self.image_prefix = image_prefix
        self.subject_key, self.present_key, self.labels_key = subject_key, present_key, labels_key
        self._loader = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)
        self._nifti_reader = NibabelReader()  # passed at call time so that no other reader is tried
        self._resize = {o: Resize(s, mode="trilinear", anti_aliasing=False) for o, s in shapes.items()}

    def _scale(self, arr: np.ndarray) -> np.ndarray:
        """Intensity scaling of one volume; a constant volume gives zeros.

        Written in numpy rather than through MONAI's ``ScaleIntensityRangePercentiles`` (same result with
        ``clip=True``) because ``np.percentile`` partitions where ``torch.quantile`` sorts: loading a subject
        took about 10x longer through the MONAI transform.
        """
        if self.intensity == "percentile":
            lo, hi = np.percentile(arr, (self.lower, self.upper))
            if hi <= lo:  # constant image
                return np.zeros_like(arr)
            return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
        std = float(arr.std())
        return ((arr - arr.mean()) / (std if std > 0 else 1.0)).astype(np.float32)

    def _load(self, path: Any, organ: str, subject: str) -> torch.Tensor:
        name = f"subject {subject!r}: {organ} file {path}"
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"subject {subject!r}: {organ} must be a file path, got {type(path).__name__}: {path!r}.")
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name} does not exist.")
        reader = self._nifti_reader if path.lower().endswith(_NIFTI_SUFFIXES) else None
        try:
            img = self._loader(path, reader=reader)
        except Exception as e:
            cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(f"{name} cannot be read (corrupt or not an image): {type(e).__name__}: {cause}") from e
        check_single_channel_3d(img, name)
        arr = np.asarray(img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else img, dtype=np.float32)
        n = arr.size - int(np.isfinite(arr).sum())
        if n:
            raise ValueError(f"{name}: {n} non-finite voxels (NaN or Inf) out of {arr.size}.")
        out = self._resize[organ](torch.from_numpy(self._scale(arr)))
        out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
        return out.to(torch.float32).contiguous()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Load one subject; see the class doc for the keys written."""
        d = dict(data)
        subject = _subject(d, self.subject_key)
        flags = _present_mask(d, self.present_key, len(self.organs), subject)
        present = torch.zeros(len(self.organs), dtype=torch.bool)
        for i, organ in enumerate(self.organs):
            path = d.get(organ)
            given = path is not None and path != ""
            if flags is not None and bool(flags[i]) and not given:
                raise ValueError(f"subject {subject!r}: {organ} is marked present but has no file path.")
            if given and (flags is None or bool(flags[i])):
                d[self.image_prefix + organ] = self._load(path, organ, subject)
                present[i] = True
            else:
                d[self.image_prefix + organ] = torch.zeros(1, *self.organ_shapes[organ], dtype=torch.float32)
            if path is None:
                d[organ] = ""
        d[self.present_key] = present
        if d.get(self.labels_key) is not None:
            d[self.labels_key] = torch.as_tensor(np.asarray(d[self.labels_key], dtype=np.float32)).flatten()
        return d


def organ_drop_draws(subject: str, seed: int, n: int) -> np.ndarray:
    """``n`` uniform draws in ``[0, 1)`` fixed by ``seed`` and the subject id (BLAKE2b, not Python's ``hash``).

    The same subject gets the same draws in every process, run and model; draw ``i`` belongs to organ ``i``
    whatever the other organs' presence.
    """
    digest = hashlib.blake2b(f"{int(seed)}\x00{subject}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little")).random(n)


class DropOrgansd(Transform):
    """Test-time missing-organ protocol of Pan-FM: mark organs missing (``present`` False, image zeroed).

    - ``"none"``: nothing dropped.
    - ``"leave_out"``: ``organ`` is dropped for every subject that has it.
    - ``"random"``: each present organ is dropped when its draw from :func:`organ_drop_draws` (seeded by
      ``seed`` and the subject id) is below ``rate``: deterministic per subject, independent across organs,
      the same in every run and for every model; about ``rate`` of the present organs are dropped.

    With ``keep_at_least_one`` a subject never loses its last present organ (``"random"`` restores the
    dropped organ with the largest draw; ``"leave_out"`` keeps a subject's only organ). The dropped organ
    names, in ``organs`` order, go to ``data[dropped_key]`` (a list of varying length: set
    ``dropped_key=None`` or remove the key before batching with the default collate). Inputs are not
    modified in place, so cached items stay intact.

    Args:
        organs: organ names, in the order of ``present``.
        mode: one of :data:`SUPPORTED_DROP_MODES`.
        organ: the organ left out (``"leave_out"`` only).
        rate: drop probability per present organ (``"random"``), in ``[0, 1]``.
        seed: seed of the random drops.
        keep_at_least_one: never drop a subject's last present organ.
        image_prefix: prefix of the image keys (``image_<organ>``).
        subject_key: key of the subject id (the draws depend on it).
        present_key: key of the presence mask, bool ``(len(organs),)``.
        dropped_key: where to record the dropped organ names; ``None`` records nothing.
    """

    def __init__(
        self,
        organs: Sequence[str] = ORGANS,
        mode: Literal["none", "leave_out", "random"] = "none",
        organ: str | None = None,
        rate: float = 0.0,
        seed: int = 0,
        keep_at_least_one: bool = True,
        image_prefix: str = "image_",
        subject_key: str = "subject",
        present_key: str = "present",
        dropped_key: str | None = "dropped",
    ) -> None:
        self.organs = tuple(organs)
        if mode not in SUPPORTED_DROP_MODES:
            raise ValueError(f"mode must be one of {SUPPORTED_DROP_MODES}, got {mode!r}.")
        if mode == "leave_out" and organ not in self.organs:
            raise ValueError(f"mode 'leave_out' needs organ to be one of {self.organs}, got {organ!r}.")
        if mode != "leave_out" and organ is not None:
            raise ValueError(f"organ={organ!r} is only used with mode='leave_out' (mode is {mode!r}).")
        if not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate!r}.")
        self.mode, self.organ, self.rate, self.seed = mode, organ, float(rate), int(seed)
        self.keep_at_least_one = bool(keep_at_least_one)
        self.image_prefix, self.subject_key = image_prefix, subject_key
        self.present_key, self.dropped_key = present_key, dropped_key

    def _drop_mask(self, present: torch.Tensor, subject: str) -> np.ndarray:
        """Bool ``(len(organs),)``: the present organs to drop."""
        keep = present.numpy().copy()
        if self.mode == "leave_out":
            drop = np.array([o == self.organ for o in self.organs]) & keep
            if self.keep_at_least_one and drop.any() and keep.sum() == 1:
                drop[:] = False
            return drop
        if self.mode == "none":
            return np.zeros_like(keep)
        draws = organ_drop_draws(subject, self.seed, len(self.organs))
        drop = (draws < self.rate) & keep
        if self.keep_at_least_one and keep.any() and drop.sum() == keep.sum():
            drop[int(np.argmax(np.where(drop, draws, -1.0)))] = False
        return drop

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Drop organs of one subject; see the class doc."""
        d = dict(data)
        subject = _subject(d, self.subject_key)
        present = _present_mask(d, self.present_key, len(self.organs), subject)
        if present is None:
            raise ValueError(f"subject {subject!r}: no {self.present_key!r} mask (run LoadOrgansd first).")
        if self.mode == "random" and self.subject_key not in d:
            raise ValueError(f"DropOrgansd(mode='random') needs the subject id {self.subject_key!r} to seed drops.")
        drop = self._drop_mask(present, subject)
        for i in np.flatnonzero(drop):
            key = self.image_prefix + self.organs[i]
            if key not in d:
                raise ValueError(f"subject {subject!r}: no {key!r} to drop (run LoadOrgansd first).")
            d[key] = torch.zeros_like(torch.as_tensor(d[key]))
        d[self.present_key] = present & ~torch.from_numpy(drop)
        if self.dropped_key is not None:
            d[self.dropped_key] = [self.organs[i] for i in np.flatnonzero(drop)]
        return d
