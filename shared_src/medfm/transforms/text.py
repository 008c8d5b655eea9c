"""Tokenise a metadata prompt inside the data pipeline."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import MapTransform

from .prompt import PromptTokenizer

__all__ = ["TokenizePromptd"]


class TokenizePromptd(MapTransform):
    """Encode ``data[key]`` (a prompt string) with a :class:`~medfm.transforms.PromptTokenizer` into
    ``data[f"{key}{suffix}"]``, a (context_length,) long tensor.

    Args:
        keys: keys of the prompt strings.
        tokenizer: the tokenizer (its vocabulary must match the text encoder's).
        suffix: appended to each key to name the output.
    """

    def __init__(
        self, keys: str | list[str], tokenizer: PromptTokenizer, suffix: str = "_ids", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.tokenizer = tokenizer
        self.suffix = suffix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if not isinstance(d[key], str):
                raise ValueError(f"case {d.get('case', '?')}: {key!r} must be a prompt string, got {type(d[key])}.")
            d[f"{key}{self.suffix}"] = self.tokenizer(d[key])
        return d
