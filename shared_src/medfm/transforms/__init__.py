"""Transforms of medfm: PET/CT loading, FratMAE's stack crops, SPAD-ViT's depth-first layout, rows-first 2D images."""

from __future__ import annotations

from .checks import LoadImageNamedd, MinSpatialSized, source_name
from .midol import IMAGENET_MEAN, IMAGENET_STD, MIDoLInputd, MultiCropd, ResizeNormalized, ScaleIntensity8Bitd
from .one_hot import SegmentationOneHotd
from .panfm import (
    SUPPORTED_DROP_MODES,
    SUPPORTED_ORGAN_INTENSITY,
    DropOrgansd,
    LoadOrgansd,
    organ_drop_draws,
)
from .petct import (
    LoadPETCTd,
    PETCTChannelsd,
    PETCTIntensityd,
    check_finite,
    check_same_grid,
    check_single_channel_3d,
    count_nonfinite,
    grid_mismatch,
    resample_to_reference,
)
from .planar import NoChannelMetad, RowsFirstd, is_planar_file
from .prompt import PROMPT_FIELDS, PromptTokenizer, build_prompt
from .spad import (
    SUPPORTED_INTENSITY,
    ReorientToDepthd,
    ScaleIntensitySpadd,
    SpadLayout,
    SpadRandCropd,
    ToRGBd,
    spad_layout,
    spad_roi_size,
    through_plane_axis,
)
from .spad_augment import SpadRandAffineCropd, SpadScaleAugment
from .spad_input import CropForegroundSpadd, LimitInPlaneSized, positive_in_all_channels, spad_limit_in_plane
from .stack_presets import SEGMENTATION_PATCHES, STACKS, segmentation_roi, stack_settings
from .stacks import RandStackCrop, RandStackCropd, StackCrop, stack_crop_starts
from .text import TokenizePromptd

__all__ = [
    "NoChannelMetad",
    "LoadImageNamedd",
    "PETCTIntensityd",
    "MinSpatialSized",
    "source_name",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MIDoLInputd",
    "MultiCropd",
    "ResizeNormalized",
    "SEGMENTATION_PATCHES",
    "SegmentationOneHotd",
    "ScaleIntensity8Bitd",
    "STACKS",
    "SUPPORTED_DROP_MODES",
    "SUPPORTED_INTENSITY",
    "SUPPORTED_ORGAN_INTENSITY",
    "DropOrgansd",
    "LoadOrgansd",
    "LoadPETCTd",
    "PETCTChannelsd",
    "RandStackCrop",
    "RandStackCropd",
    "ReorientToDepthd",
    "RowsFirstd",
    "CropForegroundSpadd",
    "LimitInPlaneSized",
    "positive_in_all_channels",
    "spad_limit_in_plane",
    "ScaleIntensitySpadd",
    "SpadLayout",
    "SpadRandAffineCropd",
    "SpadRandCropd",
    "SpadScaleAugment",
    "StackCrop",
    "ToRGBd",
    "TokenizePromptd",
    "PROMPT_FIELDS",
    "PromptTokenizer",
    "build_prompt",
    "check_finite",
    "check_same_grid",
    "check_single_channel_3d",
    "count_nonfinite",
    "grid_mismatch",
    "is_planar_file",
    "organ_drop_draws",
    "resample_to_reference",
    "spad_layout",
    "spad_roi_size",
    "stack_crop_starts",
    "segmentation_roi",
    "stack_settings",
    "through_plane_axis",
]
