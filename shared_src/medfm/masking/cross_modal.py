"""FratMAE's asymmetric cross-modal masking, and the per-modality masking of the plain-MAE ablation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .random import TokenMask, random_masking

__all__ = ["asymmetric_cross_modal_masking", "independent_masking"]


def asymmetric_cross_modal_masking(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float = 0.5,
    modalities: Sequence[str] = ("pet", "ct"),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    masked_modality: str | None = None,
) -> dict[str, TokenMask | None]:
    """Pick one modality S at random and mask ``mask_ratio`` of its tokens; the others stay fully visible.

    FratMAE (Oh et al., arXiv:2503.02824, Sec. 2.1): "one modality is randomly selected as the masked target
    while another is unmasked for each iteration" — one S for the whole batch of an iteration.

    Args:
        batch_size, num_tokens, mask_ratio, generator, device: as :func:`random_masking`.
        modalities: names of the modalities.
        masked_modality: force S instead of drawing it.

    Returns:
        ``{modality: TokenMask or None}``, exactly one entry not None.
    """
    if len(modalities) < 2:
        raise ValueError(f"cross-modal masking needs at least two modalities, got {list(modalities)}.")
    if masked_modality is None:
        dev = generator.device if generator is not None else device
        pick = int(torch.randint(len(modalities), (1,), generator=generator, device=dev).item())
        masked_modality = modalities[pick]
    elif masked_modality not in modalities:
        raise ValueError(f"masked_modality={masked_modality!r} is not one of {list(modalities)}.")
    out: dict[str, TokenMask | None] = dict.fromkeys(modalities)
    out[masked_modality] = random_masking(batch_size, num_tokens, mask_ratio, generator, device)
    return out


def independent_masking(
    batch_size: int,
    num_tokens: int,
    mask_ratio: float,
    modalities: Sequence[str] = ("pet", "ct"),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> dict[str, TokenMask | None]:
    """Mask every modality independently (the plain per-modality MAE of the paper's ablation)."""
    return {m: random_masking(batch_size, num_tokens, mask_ratio, generator, device) for m in modalities}
