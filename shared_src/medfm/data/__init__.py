"""Datalists, prompts and synthetic demo data."""

from .autopet import build_autopet_datalist, find_petct_images, split_datalist
from .splits import finetune_splits, label_fraction_subset, with_class_label
from .cache import transform_state_hash
from .prompt import PromptTokenizer, build_prompt
from .synthetic_petct import ensure_demo_petct, generate_synthetic_petct

__all__ = [
    "PromptTokenizer",
    "build_autopet_datalist",
    "build_prompt",
    "ensure_demo_petct",
    "find_petct_images",
    "finetune_splits",
    "generate_synthetic_petct",
    "label_fraction_subset",
    "split_datalist",
    "transform_state_hash",
    "with_class_label",
]
