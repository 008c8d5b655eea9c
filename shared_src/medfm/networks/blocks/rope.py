"""SPAD-ViT's 3D rotary position embedding (RoPE) on a (depth, height, width) token grid.

A head of width ``head_dim`` is rotated as ``head_dim / 2`` pairs of adjacent channels ``(2j, 2j+1)``. With
``P = head_dim / 2`` pairs and ``k = 0 … P/2 - 1``:

- pair ``k``       turns by ``z * w_z[k] + y * w_xy[k]``,
- pair ``P/2 + k`` turns by ``z * w_z[k] + x * w_xy[k]``,

where ``w_xy[k] = base_xy ** (-2k / P)`` and ``w_z[k] = base_z ** (-(2k + 1) / P)`` (bases 10000 and 2333 in
SPAD-ViT). The depth angle is added onto the in-plane pairs, so with ``z = 0`` this is EVA-02's 2D RoPE and 2D
checkpoints keep their meaning. Because every angle is linear in the position, the score ``q · k`` of two
rotated vectors depends only on the offset between their positions; with ``w_xy / w_z`` irrational, distinct
integer offsets give distinct rotations (the paper's Theorem 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Rope3D", "apply_rope", "rope_frequencies"]


def rope_frequencies(
    head_dim: int, base_z: float = 2333.0, base_xy: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_z, w_xy)``, each of ``head_dim / 4`` angular frequencies (float64)."""
    if head_dim % 4:
        raise ValueError(f"3D RoPE needs a head width divisible by 4, got {head_dim}.")
    pairs = head_dim // 2
    k = torch.arange(pairs // 2, dtype=torch.float64)
    w_xy = base_xy ** (-2.0 * k / pairs)
    w_z = base_z ** (-(2.0 * k + 1.0) / pairs)
    return w_z, w_xy


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x`` (..., L, head_dim) by angles; ``cos``/``sin``: (L, head_dim/2)."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos.to(x.dtype)
    sin = sin.to(x.dtype)
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)


class Rope3D(nn.Module):
    """Angles of SPAD-ViT's 3D RoPE for a token grid, cached per grid shape.

    Args:
        head_dim: width of one attention head (divisible by 4).
        base_z: frequency base of the depth axis (SPAD-ViT: 2333).
        base_xy: frequency base of the in-plane axes (SPAD-ViT / EVA-02: 10000).
    """

    def __init__(self, head_dim: int, base_z: float = 2333.0, base_xy: float = 10000.0) -> None:
        super().__init__()
        w_z, w_xy = rope_frequencies(head_dim, base_z, base_xy)
        self.register_buffer("w_z", w_z, persistent=False)
        self.register_buffer("w_xy", w_xy, persistent=False)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def angles(self, positions: torch.Tensor) -> torch.Tensor:
        """Angles (L, head_dim/2) for integer or real positions (L, 3) given as (z, y, x)."""
        pos = positions.to(torch.float64)
        z, y, x = pos.unbind(-1)
        depth = z[:, None] * self.w_z
        return torch.cat((depth + y[:, None] * self.w_xy, depth + x[:, None] * self.w_xy), dim=-1)

    def forward(self, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape (d*h*w, head_dim/2) for the row-major grid ``(d, h, w)``."""
        key = (tuple(int(g) for g in grid), self.w_z.device)
        if key in self._cache:
            return self._cache[key]
        axes = [torch.arange(g, device=self.w_z.device) for g in key[0]]
        positions = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        theta = self.angles(positions)
        table = (theta.cos().float(), theta.sin().float())
        if not torch.jit.is_tracing():  # a traced graph must compute the table, not close over a cached one
            self._cache[key] = table
        return table

    def _apply(self, fn, recurse=True):
        self._cache = {}
        return super()._apply(fn, recurse)
