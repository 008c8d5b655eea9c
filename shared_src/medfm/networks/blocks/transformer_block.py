"""Pre-norm transformer block with an optional cross-attention sub-layer."""

from __future__ import annotations

from typing import Literal

import torch
from monai.networks.layers import DropPath
from torch import nn

from .attention import SelfAttention
from .cross_attention import CrossAttention

__all__ = ["Mlp", "TransformerBlock"]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI's CLIP text tower."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """Linear -> activation -> Linear."""

    def __init__(self, hidden_size: int, mlp_dim: int, act: Literal["gelu", "quick_gelu"] = "gelu") -> None:
        super().__init__()
        if act not in ("gelu", "quick_gelu"):
            raise ValueError(f"act must be 'gelu' or 'quick_gelu', got {act!r}.")
        self.fc1 = nn.Linear(hidden_size, mlp_dim)
        self.act = nn.GELU() if act == "gelu" else QuickGELU()
        self.fc2 = nn.Linear(mlp_dim, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """x + SA(LN(x)) [+ CA(LN(x), context)] + MLP(LN(x)), each residual with stochastic depth.

    The cross-attention sub-layer (and its norm) exists only when ``cross_attention=True``: a block without
    it holds no unused weights (so DistributedDataParallel needs no unused-parameter search).

    Args:
        hidden_size: token width.
        num_heads: attention heads.
        mlp_dim: MLP hidden width.
        qkv_bias: bias on q, k, v projections.
        drop_path: stochastic-depth rate of this block.
        cross_attention: add a cross-attention sub-layer between self-attention and MLP.
        context_size: width of the cross-attention context (defaults to hidden_size).
        causal: causal self-attention.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        cross_attention: bool = False,
        context_size: int | None = None,
        causal: bool = False,
        act: Literal["gelu", "quick_gelu"] = "gelu",
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}.")
        self.norm1 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias, causal=causal)
        self.norm_cross: nn.LayerNorm | None = None
        self.cross_attn: CrossAttention | None = None
        if cross_attention:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=norm_eps)
            self.cross_attn = CrossAttention(hidden_size, num_heads, context_size=context_size, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.mlp = Mlp(hidden_size, mlp_dim, act=act)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            x: (B, N, hidden_size).
            context: (B, M, context_size), required iff the block has cross-attention.
            attn_mask: optional (B, N) bool key-padding mask of the self-attention, True = valid key
                (see :class:`SelfAttention`); None attends to every token.
        """
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask=attn_mask))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block has cross-attention: a context tensor is required.")
            x = x + self.drop_path(self.cross_attn(self.norm_cross(x), context))
        return x + self.drop_path(self.mlp(self.norm2(x)))
