"""Two ViT encoders, one per modality, with layer-wise concatenated features (FratMAE downstream).

Every FratMAE model keeps its pair under ``encoders.pet.*`` / ``encoders.ct.*``, so pre-trained, fine-tuned
and released weights load into each other by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from .vit_encoder import ViTEncoder

__all__ = ["MODALITIES", "evenly_spaced_layers", "twin_features", "twin_vit_encoders"]

MODALITIES = ("pet", "ct")


def evenly_spaced_layers(num_layers: int, count: int) -> list[int]:
    """``count`` block indices (0-based) spread over ``num_layers`` blocks, ending at the last one.

    12 blocks, 4 features -> [2, 5, 8, 11] (UNETR's z3, z6, z9, z12).
    """
    if count < 1:
        raise ValueError(f"count must be positive, got {count}.")
    return [max(0, round((i + 1) * num_layers / count) - 1) for i in range(count)]


def twin_vit_encoders(**encoder_kwargs: Any) -> nn.ModuleDict:
    """``{"pet": ViTEncoder, "ct": ViTEncoder}`` of one size: FratMAE's fraternal twins.

    Args:
        encoder_kwargs: keyword arguments of :class:`ViTEncoder` (``in_channels``, ``patch_size``,
            ``hidden_size``, ...), the same for both.
    """
    return nn.ModuleDict({m: ViTEncoder(**encoder_kwargs) for m in MODALITIES})


def twin_features(
    encoders: nn.ModuleDict, image: torch.Tensor, indices: Sequence[int], stop_early: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, ...]]:
    """Run the PET encoder on channel 0 and the CT encoder on channel 1 of ``image`` and concatenate their
    hidden states layer-wise, as FratMAE's downstream models do (Oh et al., arXiv:2503.02824, Sec. 2.4.3).

    Args:
        encoders: ``{"pet": ViTEncoder, "ct": ViTEncoder}`` (see :func:`twin_vit_encoders`), one input channel each.
        image: (B, 2, *spatial), channel 0 PET, channel 1 CT.
        indices: block indices whose outputs to return.
        stop_early: run the encoders only up to the deepest requested block (see ``ViTEncoder.forward_intermediates``).

    Returns:
        final normed tokens (B, 1 + N, 2 * hidden_size), the requested block outputs
        (B, 1 + N, 2 * hidden_size) each, and the token grid. PET features come first.
    """
    if image.ndim < 3 or image.shape[1] != 2:
        raise ValueError(f"expected a (B, 2, ...) PET/CT image, got shape {tuple(image.shape)}.")
    finals, inters = [], []
    grid: tuple[int, ...] = ()
    for c, m in enumerate(MODALITIES):
        final, inter = encoders[m].forward_intermediates(image[:, c : c + 1], indices, stop_early=stop_early)
        grid = encoders[m].token_grid(image)
        finals.append(final)
        inters.append(inter)
    merged = [torch.cat([p, c], dim=-1) for p, c in zip(inters[0], inters[1])]
    return torch.cat(finals, dim=-1), merged, grid
