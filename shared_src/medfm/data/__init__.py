"""Datalists and synthetic demo data."""

from .aniso_sampler import AnisoBatchSampler, SpadDrawDataset, aniso_batch_sampler
from .autopet import (
    build_autopet_datalist,
    exclude_split_cases,
    find_petct_images,
    fratmae_pretraining_datalist,
    require_informative_prompts,
    split_datalist,
)
from .autopet_metadata import autopet_clinical_metadata, tracer_from_case_id
from .cache import transform_state_hash
from .chunked import ChunkedArray, save_chunked
from .crop_cache import CropCacheDataset
from .failures import FAILED_KEY, LOAD_ERROR_KEY, FileErrorDataset, collate_skip_failed, error_reason, item_source
from .group_sampler import GroupBatchSampler, length_buckets, shuffle_batch_sampler
from .midol import MODALITIES, UNLABELLED, build_image_folder_datalist, find_modality_images
from .panfm import (
    ORGANS,
    PANFM_TABLE,
    label_names_from_table,
    read_subject_table,
    subject_token_counts,
    token_bucket_sampler,
)
from .petct_studies import export_petct_studies, write_petct_study
from .seeded import SeededDataset, SeededSample, seeded_random_state
from .spad import SpadHeaderd, build_spad_datalist, find_spad_images, with_spad_headers
from .splits import finetune_splits, label_fraction_subset, with_class_label
from .studies import LABELS_SUBDIR, STUDY_SUFFIXES, studies_datalist
from .synthetic_midol import MIDOL_MASK_VALUE, ensure_demo_midol, generate_synthetic_midol
from .synthetic_panfm import (
    DEFAULT_ORGAN_SHAPES,
    DEFAULT_ORGAN_SPACINGS,
    PANFM_DEMO_LABELS,
    ensure_demo_panfm,
    generate_synthetic_panfm,
)
from .synthetic_petct import ensure_demo_petct, generate_synthetic_petct
from .synthetic_spad import SPAD_LABELS, ensure_demo_spad, generate_synthetic_spad

__all__ = [
    "FAILED_KEY",
    "LOAD_ERROR_KEY",
    "FileErrorDataset",
    "collate_skip_failed",
    "error_reason",
    "item_source",
    "LABELS_SUBDIR",
    "export_petct_studies",
    "studies_datalist",
    "write_petct_study",
    "MIDOL_MASK_VALUE",
    "MODALITIES",
    "UNLABELLED",
    "build_image_folder_datalist",
    "ensure_demo_midol",
    "find_modality_images",
    "generate_synthetic_midol",
    "DEFAULT_ORGAN_SHAPES",
    "DEFAULT_ORGAN_SPACINGS",
    "ORGANS",
    "PANFM_DEMO_LABELS",
    "PANFM_TABLE",
    "SPAD_LABELS",
    "SpadHeaderd",
    "STUDY_SUFFIXES",
    "AnisoBatchSampler",
    "SpadDrawDataset",
    "GroupBatchSampler",
    "length_buckets",
    "shuffle_batch_sampler",
    "SeededDataset",
    "SeededSample",
    "seeded_random_state",
    "subject_token_counts",
    "token_bucket_sampler",
    "aniso_batch_sampler",
    "autopet_clinical_metadata",
    "build_autopet_datalist",
    "exclude_split_cases",
    "fratmae_pretraining_datalist",
    "require_informative_prompts",
    "tracer_from_case_id",
    "build_spad_datalist",
    "ensure_demo_panfm",
    "ensure_demo_petct",
    "ensure_demo_spad",
    "find_petct_images",
    "find_spad_images",
    "finetune_splits",
    "generate_synthetic_panfm",
    "generate_synthetic_petct",
    "generate_synthetic_spad",
    "label_fraction_subset",
    "label_names_from_table",
    "read_subject_table",
    "split_datalist",
    "transform_state_hash",
    "ChunkedArray",
    "save_chunked",
    "CropCacheDataset",
    "with_spad_headers",
    "with_class_label",
]
