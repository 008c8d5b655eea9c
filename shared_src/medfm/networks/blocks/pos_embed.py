"""Fixed sine-cosine position embeddings computed from the token grid at forward time."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["sincos_pos_embed"]


def sincos_pos_embed(
    grid: Sequence[int],
    dim: int,
    temperature: float = 10000.0,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """N-d sine-cosine position embedding (MAE's 2D embedding, one block of channels per axis).

    Each axis gets ``2 * (dim // (2 * nd))`` channels (half sine, half cosine, frequencies
    ``temperature ** (-i / n)``); channels left over when ``dim`` is not a multiple of ``2 * nd`` are zero.
    Nothing is sized from an image size: any grid works.

    Args:
        grid: tokens per spatial axis, e.g. (10, 2, 12).
        dim: embedding width.

    Returns:
        (prod(grid), dim), tokens in raster order (last axis fastest), as :func:`patchify` orders them.
    """
    nd = len(grid)
    per_axis = dim // (2 * nd)
    if per_axis < 1:
        raise ValueError(f"dim={dim} is too small for a {nd}-d sine-cosine embedding (needs at least {2 * nd}).")
    omega = temperature ** (-torch.arange(per_axis, dtype=torch.float64, device=device) / per_axis)
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64, device=device) for g in grid], indexing="ij")
    parts = []
    for c in coords:
        angle = c.reshape(-1, 1) * omega.reshape(1, -1)
        parts += [torch.sin(angle), torch.cos(angle)]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1)
    return emb.to(dtype)
