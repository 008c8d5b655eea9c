"""Encoder sizes by name, one table per encoder family, and the rule every encoder reads its ``size`` argument by.

An encoder takes ``size`` (a name of its table, or a mapping of the same keywords) and the individual size keywords
(``hidden_size``, ...) defaulting to None: a keyword given explicitly wins over the size, so
``ViTEncoder(size="base", num_layers=6)`` is ViT-B with 6 blocks. A bundle config then names its size once
(``"size": "base"``) and its demo overlays pass the demo size as one mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["SPAD_VIT_SIZES", "SWIN_SIZES", "VIT_SIZES", "resolve_size"]

VIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 192, "num_layers": 12, "num_heads": 3, "mlp_dim": 768},
    "small": {"hidden_size": 384, "num_layers": 12, "num_heads": 6, "mlp_dim": 1536},
    "base": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "mlp_dim": 3072},
    "large": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16, "mlp_dim": 4096},
}
"""ViT sizes by name (Dosovitskiy et al.; DeiT for tiny/small): ``ViTEncoder(size="base", patch_size=16)``."""

SPAD_VIT_SIZES: dict[str, dict[str, int]] = {
    "base": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "mlp_dim": 2048},
}
"""SPAD-ViT sizes by name: ``base`` is the released ViT-B with a SwiGLU MLP of 2048."""

_SWIN_SHARED = {"patch_size": 4, "window_size": 7, "mlp_ratio": 4.0}
SWIN_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {**_SWIN_SHARED, "embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24)},
    "small": {**_SWIN_SHARED, "embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24)},
    "base": {**_SWIN_SHARED, "embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)},
    "large": {**_SWIN_SHARED, "embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48)},
}
"""Swin sizes by name (Liu et al., arXiv:2103.14030, Sec. 3.3: Swin-T/S/B/L, all at patch 4, window 7, MLP ratio 4)."""


def resolve_size(presets: Mapping[str, Mapping[str, Any]], size: str | Mapping[str, Any], **given: Any) -> dict:
    """The size keywords of an encoder: those of ``size``, then each of ``given`` that is not None over them.

    Args:
        presets: the encoder family's table (e.g. :data:`VIT_SIZES`); every entry has the same keywords.
        size: a name of ``presets``, or a mapping holding every keyword of the table.
        given: the encoder's size keywords as the caller passed them (None: take the size's).

    Returns:
        ``{keyword: value}`` for every keyword of ``given``, in its order.

    Raises:
        ValueError: an unknown size name, or a mapping without the table's keywords or with others.
    """
    if isinstance(size, str):
        if size not in presets:
            raise ValueError(f"unknown size {size!r}; known sizes: {sorted(presets)}.")
        values = presets[size]
    elif isinstance(size, Mapping):
        values = size
        if set(values) != set(given):
            raise ValueError(
                f"a size mapping needs exactly the keywords {sorted(given)}, got {sorted(values)} "
                f"(missing {sorted(set(given) - set(values))}, unknown {sorted(set(values) - set(given))})."
            )
    else:
        raise ValueError(f"size must be a name of {sorted(presets)} or a mapping of {sorted(given)}, got {size!r}.")
    return {k: values[k] if v is None else v for k, v in given.items()}
