"""Preprocessing steps that several configs of one bundle share, under one name each."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.transforms import ScaleIntensityRanged, Transform

__all__ = ["PETCTIntensityd"]


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
