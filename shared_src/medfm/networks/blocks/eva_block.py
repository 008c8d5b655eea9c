"""EVA-02's transformer block: the shared :class:`TransformerBlock` with q/v biases, rotary positions on the patch
tokens and SwiGLU with an inner LayerNorm (Fang et al., arXiv:2303.11331)."""

from __future__ import annotations

from functools import partial

from .attention import SelfAttention
from .transformer_block import SwiGLU, TransformerBlock

__all__ = ["eva_block"]


def eva_block(
    hidden_size: int, num_heads: int, mlp_dim: int, drop_path: float = 0.0, num_prefix: int = 1
) -> TransformerBlock:
    """Pre-norm EVA-02 block ``x + attn(norm1(x), rope)``, ``x + mlp(norm2(x))`` with stochastic depth.

    Args:
        hidden_size: token width.
        num_heads: heads; must divide hidden_size.
        mlp_dim: SwiGLU hidden width.
        drop_path: stochastic-depth rate.
        num_prefix: leading tokens (CLS) left unrotated by RoPE.
    """
    return TransformerBlock(
        hidden_size,
        num_heads,
        mlp_dim,
        qkv_bias="qv",
        drop_path=drop_path,
        act="silu",
        norm_eps=1e-5,
        attn_class=partial(SelfAttention, num_prefix=num_prefix),
        mlp_class=SwiGLU,
    )
