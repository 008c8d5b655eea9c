"""Multi-head cross-attention: queries from one token sequence, keys and values from another."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CrossAttention"]


class CrossAttention(nn.Module):
    """Cross-attention as in FratMAE's cross-attention decoder (Oh et al., arXiv:2503.02824): the masked
    modality's tokens are the query, the unmasked modality's tokens are key and value.

    Args:
        hidden_size: width of the query tokens (and of the output).
        num_heads: attention heads; must divide hidden_size.
        context_size: width of the key/value tokens; defaults to hidden_size.
        qkv_bias: learn a bias on q, k and v.
    """

    def __init__(self, hidden_size: int, num_heads: int, context_size: int | None = None, qkv_bias: bool = True):
        super().__init__()
        if num_heads < 1 or hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
        context_size = hidden_size if context_size is None else context_size
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size, bias=qkv_bias)
        self.kv = nn.Linear(context_size, 2 * hidden_size, bias=qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: queries (B, N, hidden_size).
            context: keys/values (B, M, context_size).

        Returns:
            (B, N, hidden_size).
        """
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(context).reshape(b, context.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))
