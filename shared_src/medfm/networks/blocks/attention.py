"""Multi-head self-attention through ``torch.nn.functional.scaled_dot_product_attention``."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope

__all__ = ["SelfAttention"]


class SelfAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al., arXiv:1706.03762) with a fused qkv projection.

    The qkv / proj names and shapes match timm's ``Attention`` and OpenAI CLIP's ``in_proj``/``out_proj``
    (after renaming), so foreign checkpoints map by key renaming alone. With ``qkv_bias="qv"`` it is EVA-02's
    attention (Fang et al., arXiv:2303.11331; as BEiT): ``qkv`` has no bias, learnable ``q_bias`` and ``v_bias``
    are added (k has none); rotary position embeddings (``rope``) rotate q and k of every token but the first
    ``num_prefix``.

    Args:
        hidden_size: token width.
        num_heads: attention heads; must divide hidden_size.
        qkv_bias: learn a bias on q, k and v (True), none (False), or on q and v only ("qv", EVA-02).
        causal: mask attention to later tokens (text encoders).
        attn_drop: dropout on attention weights during training.
        num_prefix: leading tokens (CLS) left unrotated by RoPE.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        qkv_bias: bool | Literal["qv"] = True,
        causal: bool = False,
        attn_drop: float = 0.0,
        num_prefix: int = 1,
    ) -> None:
        super().__init__()
        if num_heads < 1 or hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}.")
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f"attn_drop must be in [0, 1), got {attn_drop}.")
        if qkv_bias not in (True, False, "qv"):
            raise ValueError(f"qkv_bias must be True, False or 'qv', got {qkv_bias!r}.")
        if num_prefix < 0:
            raise ValueError(f"num_prefix must be >= 0, got {num_prefix}.")
        self.num_heads = num_heads
        self.causal = causal
        self.attn_drop = attn_drop
        self.num_prefix = num_prefix
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias is True)
        if qkv_bias == "qv":
            self.q_bias = nn.Parameter(torch.zeros(hidden_size))
            self.v_bias = nn.Parameter(torch.zeros(hidden_size))
        else:
            self.register_parameter("q_bias", None)
            self.register_parameter("v_bias", None)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def _qkv_bias(self) -> torch.Tensor | None:
        """The (3 * hidden_size,) bias of the fused projection (zeros for k with ``qkv_bias="qv"``)."""
        if self.q_bias is None:
            return self.qkv.bias
        return torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: (B, N, hidden_size).
            attn_mask: optional (B, N) bool key-padding mask, True = valid key (attended to), False = padding
                (SDPA's convention; the opposite of ``nn.MultiheadAttention``'s ``key_padding_mask``). Each
                sample needs at least one valid key. None (default) attends to every key.
            rope: optional ``(cos, sin)`` of :class:`~medfm.networks.blocks.Rope3D` for the N - num_prefix
                rotated tokens.

        Returns:
            (B, N, hidden_size); outputs at padded query positions are defined but meaningless.
        """
        b, n, c = x.shape
        qkv = F.linear(x, self.qkv.weight, self._qkv_bias()).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            p = self.num_prefix
            cos, sin = rope
            q = torch.cat((q[:, :, :p], apply_rope(q[:, :, p:], cos, sin)), dim=2)
            k = torch.cat((k[:, :, :p], apply_rope(k[:, :, p:], cos, sin)), dim=2)
        dropout_p = self.attn_drop if self.training else 0.0
        if attn_mask is None:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.causal)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=self._key_mask(attn_mask, b, n), dropout_p=dropout_p)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))

    @torch.no_grad()
    def cls_attention(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities of the first token's (CLS) query over all keys, without RoPE or causal mask,
        in float32 and without gradient (a saliency read-out, not a training signal).

        Args:
            x: (B, N, hidden_size), the input of this attention (after the block's norm).
            attn_mask: optional (B, N) bool key-padding mask, True = valid key (as :meth:`forward`).

        Returns:
            (B, num_heads, N) float32, each row summing to 1 over the valid keys (0 at padding).
        """
        b, n, c = x.shape
        h = self.num_heads
        w, bias = self.qkv.weight, self._qkv_bias()
        q = F.linear(x[:, :1], w[:c], None if bias is None else bias[:c])
        k = F.linear(x, w[c : 2 * c], None if bias is None else bias[c : 2 * c])
        q = q.reshape(b, 1, h, c // h).transpose(1, 2).float()
        k = k.reshape(b, n, h, c // h).transpose(1, 2).float()
        logits = (q @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(c // h)  # (B, H, N)
        if attn_mask is not None:
            self._check_mask(attn_mask, b, n)
            logits = logits.masked_fill(~attn_mask[:, None, :], float("-inf"))
        return logits.softmax(-1)

    def _key_mask(self, attn_mask: torch.Tensor, b: int, n: int) -> torch.Tensor:
        """(B, N) bool key-padding mask -> (B, 1, 1 or N, N) bool SDPA mask (with the causal mask if any)."""
        self._check_mask(attn_mask, b, n)
        mask = attn_mask[:, None, None, :]
        if self.causal:  # SDPA takes is_causal or attn_mask, not both: fold the causal mask in
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
        return mask

    @staticmethod
    def _check_mask(attn_mask: torch.Tensor, b: int, n: int) -> None:
        if attn_mask.dtype != torch.bool or tuple(attn_mask.shape) != (b, n):
            raise ValueError(
                f"attn_mask must be a ({b}, {n}) bool key-padding mask, got {attn_mask.dtype} {tuple(attn_mask.shape)}."
            )
