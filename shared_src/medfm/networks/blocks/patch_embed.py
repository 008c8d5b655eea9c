"""Patch embedding that embeds only the tokens it is asked for, and (un)patchify helpers.

The projection is stored as a convolution with kernel = stride = patch size (the usual ViT layout, so
checkpoints of conv patch embeddings load), but computed as one matrix product over patchified voxels.
That lets the encoder embed only the kept tokens of a masked image: masked tokens never cost a FLOP.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import Conv
from monai.utils import ensure_tuple_rep

__all__ = ["PatchEmbed", "patchify", "unpatchify", "token_grid"]


def token_grid(spatial_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, ...]:
    """Number of tokens along each spatial axis; raises ValueError if a size is not a multiple of the patch."""
    if len(spatial_shape) != len(patch_size):
        raise ValueError(f"image has {len(spatial_shape)} spatial dims but patch_size is {tuple(patch_size)}.")
    for s, p in zip(spatial_shape, patch_size):
        if s % p != 0:
            raise ValueError(
                f"image spatial shape {tuple(spatial_shape)} is not divisible by patch size {tuple(patch_size)}."
            )
    return tuple(s // p for s, p in zip(spatial_shape, patch_size))


def patchify(x: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """Cut an image into non-overlapping patches.

    Args:
        x: (B, C, *spatial).
        patch_size: patch size per spatial dim.

    Returns:
        (B, N, C * prod(patch_size)); tokens in raster order of the token grid, each patch flattened as
        (C, p0, p1, ...) — the same order as a conv weight ``(out, C, p0, p1, ...)`` flattens.
    """
    b, c, *spatial = x.shape
    grid = token_grid(spatial, patch_size)
    nd = len(spatial)
    shape = [b, c]
    for g, p in zip(grid, patch_size):
        shape += [g, p]
    x = x.reshape(shape)
    # (B, C, g0, p0, g1, p1, ...) -> (B, g0, g1, ..., C, p0, p1, ...)
    perm = [0, *[2 + 2 * i for i in range(nd)], 1, *[3 + 2 * i for i in range(nd)]]
    return x.permute(perm).reshape(b, -1, c * math.prod(patch_size))


def unpatchify(tokens: torch.Tensor, grid: Sequence[int], patch_size: Sequence[int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, C * prod(patch)) -> (B, C, *spatial)."""
    b = tokens.shape[0]
    nd = len(grid)
    x = tokens.reshape(b, *grid, channels, *patch_size)
    # (B, g0, g1, ..., C, p0, p1, ...) -> (B, C, g0, p0, g1, p1, ...)
    perm = [0, nd + 1]
    for i in range(nd):
        perm += [1 + i, nd + 2 + i]
    return x.permute(perm).reshape(b, channels, *[g * p for g, p in zip(grid, patch_size)])


class PatchEmbed(nn.Module):
    """Linear patch embedding (ViT, Dosovitskiy et al., arXiv:2010.11929) that can skip masked tokens.

    Args:
        in_channels: image channels.
        hidden_size: token width.
        patch_size: patch size, an int or one per spatial dim.
        spatial_dims: 2 or 3.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int | Sequence[int], spatial_dims: int = 3):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.patch_size = ensure_tuple_rep(patch_size, spatial_dims)
        if any(p < 1 for p in self.patch_size):
            raise ValueError(f"patch_size must be positive, got {patch_size}.")
        self.in_channels = in_channels
        self.proj = Conv[Conv.CONV, spatial_dims](in_channels, hidden_size, self.patch_size, stride=self.patch_size)
        # MAE initialisation: the projection treated as a Linear layer (xavier on the flattened weight).
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
        """
        Args:
            x: (B, C, *spatial), each spatial size a multiple of the patch size.
            ids_keep: (B, L) long, indices (raster order) of the tokens to embed; None embeds all.

        Returns:
            tokens (B, L or N, hidden_size) and the token grid.
        """
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channel(s), got an image of shape {tuple(x.shape)}.")
        patches = patchify(x, self.patch_size)
        grid = token_grid(x.shape[2:], self.patch_size)
        if ids_keep is not None:
            patches = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        w = self.proj.weight
        return F.linear(patches, w.reshape(w.shape[0], -1), self.proj.bias), grid
