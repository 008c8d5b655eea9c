"""Transforms of medfm: PET/CT loading and FratMAE's stack crops."""

from __future__ import annotations

from .petct import (
    LoadPETCTd,
    check_finite,
    check_same_grid,
    check_single_channel_3d,
    count_nonfinite,
    grid_mismatch,
    resample_to_reference,
)
from .stack_presets import STACKS, stack_settings
from .text import TokenizePromptd
from .stacks import RandStackCrop, RandStackCropd, StackCrop, stack_crop_starts

__all__ = [
    "STACKS",
    "LoadPETCTd",
    "RandStackCrop",
    "RandStackCropd",
    "StackCrop",
    "TokenizePromptd",
    "check_finite",
    "check_same_grid",
    "check_single_channel_3d",
    "count_nonfinite",
    "grid_mismatch",
    "resample_to_reference",
    "stack_crop_starts",
    "stack_settings",
]
