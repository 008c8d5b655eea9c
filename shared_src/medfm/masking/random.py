"""Uniform random token masking (MAE)."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["TokenMask", "num_visible", "random_masking"]


class TokenMask(NamedTuple):
    """One modality's mask.

    ids_keep: (B, L) long, raster indices of visible tokens (ascending noise order).
    ids_restore: (B, N) long, position of raster token n in the [visible..., masked...] sequence.
    mask: (B, N) bool, True = masked.
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def num_visible(num_tokens: int, mask_ratio: float) -> int:
    """Tokens left visible: ``round(N * (1 - mask_ratio))``, at least one."""
    return max(1, int(round(num_tokens * (1.0 - mask_ratio))))


def random_masking(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TokenMask:
    """Mask ``N - round(N (1 - mask_ratio))`` tokens of each sample uniformly at random (MAE's argsort of noise).

    Everything is drawn and computed on ``device``; pass a ``torch.Generator`` on that device for
    repeatable masks.

    Args:
        batch_size: B.
        num_tokens: N tokens per sample.
        mask_ratio: fraction to mask, in [0, 1).
        generator: random generator (on ``device``), or None for the global one.
        device: where the indices live.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
    if batch_size < 1 or num_tokens < 1:
        raise ValueError(f"batch_size and num_tokens must be positive, got {batch_size} and {num_tokens}.")
    if generator is not None:
        device = generator.device
    keep = num_visible(num_tokens, mask_ratio)
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = ids_restore >= keep
    return TokenMask(ids_keep, ids_restore, mask)
