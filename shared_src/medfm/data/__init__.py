"""Datalists, prompts and synthetic demo data."""

from .autopet import build_autopet_datalist, find_petct_images, split_datalist
from .prompt import PromptTokenizer, build_prompt
from .synthetic_petct import ensure_demo_petct, generate_synthetic_petct

__all__ = [
    "PromptTokenizer",
    "build_autopet_datalist",
    "build_prompt",
    "ensure_demo_petct",
    "find_petct_images",
    "generate_synthetic_petct",
    "split_datalist",
]
