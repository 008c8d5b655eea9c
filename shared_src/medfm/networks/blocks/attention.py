"""Multi-head self-attention through ``torch.nn.functional.scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SelfAttention"]


class SelfAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al., arXiv:1706.03762) with a fused qkv projection.

    The qkv / proj names and shapes match timm's ``Attention`` and OpenAI CLIP's ``in_proj``/``out_proj``
    (after renaming), so foreign checkpoints map by key renaming alone.

    Args:
        hidden_size: token width.
        num_heads: attention heads; must divide hidden_size.
        qkv_bias: learn a bias on q, k and v.
        causal: mask attention to later tokens (text encoders).
        attn_drop: dropout on attention weights during training.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, qkv_bias: bool = True, causal: bool = False, attn_drop: float = 0.0
    ) -> None:
        super().__init__()
        if num_heads < 1 or hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f"attn_drop must be in [0, 1), got {attn_drop}.")
        self.num_heads = num_heads
        self.causal = causal
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: (B, N, hidden_size).
            attn_mask: optional (B, N) bool key-padding mask, True = valid key (attended to), False = padding
                (SDPA's convention; the opposite of ``nn.MultiheadAttention``'s ``key_padding_mask``). Each
                sample needs at least one valid key. None (default) attends to every key.

        Returns:
            (B, N, hidden_size); outputs at padded query positions are defined but meaningless.
        """
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if attn_mask is None:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop if self.training else 0.0, is_causal=self.causal
            )
        else:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self._key_mask(attn_mask, b, n), dropout_p=self.attn_drop if self.training else 0.0
            )
        return self.proj(x.transpose(1, 2).reshape(b, n, c))

    def _key_mask(self, attn_mask: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """(B, N) bool key-padding mask -> (B, 1, 1 or N, N) bool SDPA mask (with the causal mask if any)."""
        if attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (b, n):
            raise ValueError(
                f"attn_mask must be a ({b}, {n}) bool key-padding mask, got {attn_mask.dtype} {tuple(attn_mask.shape)}."
            )
        mask = attn_mask[:, None, None, :]
        if self.causal:  # SDPA takes is_causal or attn_mask, not both: fold the causal mask in
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
        return mask
