"""EVA-02-style transformer block: q/v biases, rotary positions on patch tokens, SwiGLU with an inner LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn

from .rope import apply_rope

__all__ = ["EvaAttention", "EvaBlock", "SwiGLU"]


class EvaAttention(nn.Module):
    """Self-attention with a fused q/k/v projection without bias plus learnable ``q_bias`` and ``v_bias``
    (k has none, as in BEiT/EVA-02), rotary embedding of q and k on all tokens but the first ``num_prefix``
    (the CLS token), and SDPA.

    Args:
        hidden_size: token width.
        num_heads: heads; must divide hidden_size.
        num_prefix: leading tokens left unrotated.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_prefix: int = 1) -> None:
        super().__init__()
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.num_prefix = num_prefix
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(hidden_size))
        self.v_bias = nn.Parameter(torch.zeros(hidden_size))
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            p = self.num_prefix
            cos, sin = rope
            q = torch.cat((q[:, :, :p], apply_rope(q[:, :, p:], cos, sin)), dim=2)
            k = torch.cat((k[:, :, :p], apply_rope(k[:, :, p:], cos, sin)), dim=2)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class SwiGLU(nn.Module):
    """``fc2(norm(silu(x W1) * (x W2)))`` with W1 and W2 fused into one ``fc1`` (gate first, then value)."""

    def __init__(self, hidden_size: int, mlp_dim: int, inner_norm: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, 2 * mlp_dim)
        self.norm = nn.LayerNorm(mlp_dim) if inner_norm else nn.Identity()
        self.fc2 = nn.Linear(mlp_dim, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.norm(F.silu(gate) * value))


class EvaBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` with stochastic depth."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_dim: int, drop_path: float = 0.0, num_prefix: int = 1
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = EvaAttention(hidden_size, num_heads, num_prefix)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, mlp_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), rope))
        return x + self.drop_path(self.mlp(self.norm2(x)))
