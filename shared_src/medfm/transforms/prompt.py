"""The structured metadata prompt of FratMAE's ContextAlign and its word-level tokenizer.

FratMAE (Oh et al., "Developing a PET/CT Foundation Model for Cross-Modal Anatomical and Functional
Imaging", arXiv:2503.02824) formats text metadata as ``"<tracer> 18F FDG <diagnosis> melanoma <age> 61
<sex> M"``. The paper encodes it with a CLIP text encoder; CLIP's BPE vocabulary cannot be downloaded at
run time here, so the prompt is tokenised by a small word-level tokenizer of our own: field tags, the
tracer / diagnosis / sex words of AutoPET and of the GHSG cohort, digits (an age is spelt digit by digit),
and every other word hashed into a fixed number of buckets, so unseen words still get stable ids.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence

import torch

__all__ = ["build_prompt", "PromptTokenizer", "PROMPT_FIELDS"]

PROMPT_FIELDS = ("tracer", "diagnosis", "age", "sex")
UNKNOWN = "unknown"

_TRACER_NAMES = {
    "fdg": "18F FDG",
    "18f-fdg": "18F FDG",
    "18f fdg": "18F FDG",
    "psma": "18F PSMA",
    "18f-psma": "18F PSMA",
    "18f psma": "18F PSMA",
    "68ga-psma": "68Ga PSMA",
    "68ga psma": "68Ga PSMA",
}
_SEX_NAMES = {"m": "M", "male": "M", "f": "F", "female": "F"}


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).strip() == ""


def build_prompt(
    tracer: object = None, diagnosis: object = None, age: object = None, sex: object = None
) -> str:
    """Format one case's metadata as the paper's prompt.

    Missing values become ``unknown``; tracer and sex spellings are normalised (``FDG`` and ``18F-FDG``
    both give ``18F FDG``; ``male`` gives ``M``); ages are rounded to whole years.

    Example:
        ``build_prompt("FDG", "melanoma", 61, "M") == "<tracer> 18F FDG <diagnosis> melanoma <age> 61 <sex> M"``
    """
    tracer_s = UNKNOWN if _is_missing(tracer) else _TRACER_NAMES.get(str(tracer).strip().lower(), str(tracer).strip())
    diag_s = UNKNOWN if _is_missing(diagnosis) else str(diagnosis).strip().lower().replace("_", " ")
    if _is_missing(age):
        age_s = UNKNOWN
    else:
        try:
            age_s = str(int(round(float(age))))
        except (TypeError, ValueError):
            age_s = UNKNOWN
    sex_s = UNKNOWN if _is_missing(sex) else _SEX_NAMES.get(str(sex).strip().lower(), str(sex).strip())
    return f"<tracer> {tracer_s} <diagnosis> {diag_s} <age> {age_s} <sex> {sex_s}"


# Words with a fixed id; every other word is hashed into `num_hash_buckets` ids after them.
_SPECIALS = ("[PAD]", "[SOT]", "[EOT]")
_BASE_WORDS = (
    "<tracer>", "<diagnosis>", "<age>", "<sex>", UNKNOWN,
    "18f", "68ga", "fdg", "psma",
    "melanoma", "lymphoma", "lung", "cancer", "prostate", "negative", "control", "hodgkin",
    "m", "f",
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
)  # fmt: skip
_WORD_RE = re.compile(r"<[a-z]+>|[a-z0-9]+")


class PromptTokenizer:
    """Word-level tokenizer for the structured prompt, CLIP-style framing.

    A prompt becomes ``[SOT] w1 … wn [EOT] [PAD] …`` of length ``context_length`` (truncated so that
    ``[EOT]`` always stays); the text encoder reads its feature at the ``[EOT]`` position, as CLIP does.
    Ages are split into digits. Words outside the fixed vocabulary map to ``crc32(word) % num_hash_buckets``
    after it, so the ids are stable across processes and machines.

    Args:
        context_length: token positions per prompt (CLIP uses 77; the prompt needs about 16).
        num_hash_buckets: ids reserved for words outside the fixed vocabulary.
    """

    def __init__(self, context_length: int = 32, num_hash_buckets: int = 256) -> None:
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3 ([SOT], a word, [EOT]), got {context_length}.")
        if num_hash_buckets < 1:
            raise ValueError(f"num_hash_buckets must be positive, got {num_hash_buckets}.")
        self.context_length = context_length
        self.num_hash_buckets = num_hash_buckets
        self.vocab = {w: i for i, w in enumerate(_SPECIALS + _BASE_WORDS)}
        self.pad_id, self.sot_id, self.eot_id = (self.vocab[s] for s in _SPECIALS)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + self.num_hash_buckets

    def words(self, text: str) -> list[str]:
        """Lower-cased words of ``text``; digit runs are split into single digits."""
        out: list[str] = []
        for w in _WORD_RE.findall(text.lower()):
            out.extend(list(w) if w.isdigit() else [w])
        return out

    def word_id(self, word: str) -> int:
        if word in self.vocab:
            return self.vocab[word]
        return len(self.vocab) + zlib.crc32(word.encode("utf-8")) % self.num_hash_buckets

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, framed and padded to ``context_length``."""
        ids = [self.word_id(w) for w in self.words(text)][: self.context_length - 2]
        ids = [self.sot_id, *ids, self.eot_id]
        return ids + [self.pad_id] * (self.context_length - len(ids))

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Encode a prompt (shape ``(L,)``) or a list of prompts (shape ``(B, L)``), dtype long."""
        if isinstance(texts, str):
            return torch.tensor(self.encode(texts), dtype=torch.long)
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)
