"""Pre-norm transformer block with injected attention and MLP classes and an optional cross-attention sub-layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn

from .attention import SelfAttention
from .cross_attention import CrossAttention

__all__ = ["Mlp", "SwiGLU", "TransformerBlock"]


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


class SwiGLU(nn.Module):
    """``fc2(norm(silu(x W1) * (x W2)))`` with W1 and W2 fused into one ``fc1`` (gate first, then value), the MLP of
    EVA-02 (arXiv:2303.11331) with its inner LayerNorm.

    Args:
        hidden_size: token width.
        mlp_dim: width of the gated hidden layer.
        act: the gate's activation; only "silu".
        inner_norm: LayerNorm before ``fc2``.
    """

    def __init__(self, hidden_size: int, mlp_dim: int, act: Literal["silu"] = "silu", inner_norm: bool = True) -> None:
        super().__init__()
        if act != "silu":
            raise ValueError(f"SwiGLU gates with 'silu', got act={act!r}.")
        self.fc1 = nn.Linear(hidden_size, 2 * mlp_dim)
        self.norm = nn.LayerNorm(mlp_dim) if inner_norm else nn.Identity()
        self.fc2 = nn.Linear(mlp_dim, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.norm(F.silu(gate) * value))


class TransformerBlock(nn.Module):
    """x + SA(LN(x)) [+ CA(LN(x), context)] + MLP(LN(x)), each residual with stochastic depth.

    The attention and MLP are injected classes (as DINOv2's ``Block(attn_class=..., ffn_layer=...)``):
    ``attn_class(hidden_size, num_heads, qkv_bias=..., causal=...)`` with ``forward(x, attn_mask=, rope=)`` and
    ``mlp_class(hidden_size, mlp_dim, act=...)``. The defaults give a ViT / CLIP block; EVA-02's is
    ``qkv_bias="qv"``, ``mlp_class=SwiGLU``, ``act="silu"`` (see :func:`~medfm.networks.blocks.eva_block`).

    The cross-attention sub-layer (and its norm) exists only when ``cross_attention=True``: a block without
    it holds no unused weights (so DistributedDataParallel needs no unused-parameter search).

    Args:
        hidden_size: token width.
        num_heads: attention heads.
        mlp_dim: MLP hidden width.
        qkv_bias: bias on q, k, v projections (True / False, or "qv" for q and v only).
        drop_path: stochastic-depth rate of this block.
        cross_attention: add a cross-attention sub-layer between self-attention and MLP.
        context_size: width of the cross-attention context (defaults to hidden_size).
        causal: causal self-attention.
        act: MLP activation.
        norm_eps: LayerNorm epsilon.
        attn_class: self-attention class.
        mlp_class: MLP class.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool | Literal["qv"] = True,
        drop_path: float = 0.0,
        cross_attention: bool = False,
        context_size: int | None = None,
        causal: bool = False,
        act: Literal["gelu", "quick_gelu", "silu"] = "gelu",
        norm_eps: float = 1e-6,
        attn_class: Callable[..., nn.Module] = SelfAttention,
        mlp_class: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}.")
        self.norm1 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.attn = attn_class(hidden_size, num_heads, qkv_bias=qkv_bias, causal=causal)
        self.norm_cross: nn.LayerNorm | None = None
        self.cross_attn: CrossAttention | None = None
        if cross_attention:
            if qkv_bias == "qv":
                raise ValueError("cross-attention takes qkv_bias True or False, got 'qv'.")
            self.norm_cross = nn.LayerNorm(hidden_size, eps=norm_eps)
            self.cross_attn = CrossAttention(hidden_size, num_heads, context_size=context_size, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(hidden_size, eps=norm_eps)
        self.mlp = mlp_class(hidden_size, mlp_dim, act=act)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: (B, N, hidden_size).
            context: (B, M, context_size), required iff the block has cross-attention.
            attn_mask: optional (B, N) bool key-padding mask of the self-attention, True = valid key
                (see :class:`SelfAttention`); None attends to every token.
            rope: optional rotary ``(cos, sin)`` of the self-attention (see :class:`SelfAttention`).
        """
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask=attn_mask, rope=rope))
        if self.cross_attn is not None:
            if context is None:
                raise ValueError("this block has cross-attention: a context tensor is required.")
            x = x + self.drop_path(self.cross_attn(self.norm_cross(x), context))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def cls_attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, num_heads, N) float32 attention of the first token over all keys for the block input ``x``
        (B, N, hidden_size), without gradient (see :meth:`SelfAttention.cls_attention`)."""
        return self.attn.cls_attention(self.norm1(x), attn_mask)
