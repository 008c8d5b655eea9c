"""MAE decoder with optional cross-attention to another modality's tokens (FratMAE's D^Cross)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .pos_embed import sincos_pos_embed
from .transformer_block import TransformerBlock
from .vit_encoder import init_transformer_weights

__all__ = ["MAEDecoder"]


class MAEDecoder(nn.Module):
    """Lightweight MAE decoder (He et al., arXiv:2111.06377); with ``cross_attention=True`` the decoder of
    FratMAE (Oh et al., arXiv:2503.02824): each block is self-attention over the masked modality's tokens,
    then cross-attention with those tokens as query and the other modality's encoded tokens as key/value,
    then an MLP. Width 512 / depth 8 follow MAE's defaults (the paper leaves them open).

    Args:
        encoder_size: width of the encoder tokens (and of the context tokens).
        patch_dim: values per patch to predict (channels x prod(patch size)).
        hidden_size: decoder width.
        num_layers: decoder blocks.
        num_heads: decoder heads.
        mlp_dim: decoder MLP width.
        cross_attention: attend to a context sequence in every block.
        qkv_bias: bias on q, k, v.
    """

    def __init__(
        self,
        encoder_size: int,
        patch_dim: int,
        hidden_size: int = 512,
        num_layers: int = 8,
        num_heads: int = 16,
        mlp_dim: int = 2048,
        cross_attention: bool = True,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.cross_attention = cross_attention
        self.embed = nn.Linear(encoder_size, hidden_size)
        self.context_embed = nn.Linear(encoder_size, hidden_size) if cross_attention else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, mlp_dim, qkv_bias=qkv_bias, cross_attention=cross_attention)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.pred = nn.Linear(hidden_size, patch_dim)
        self.apply(init_transformer_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"mask_token"}

    def _with_pos(self, tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Add the position embedding to (B, 1 + N, C) tokens in raster order (CLS gets none)."""
        pos = sincos_pos_embed(grid, self.hidden_size, device=tokens.device, dtype=tokens.dtype)
        pos = torch.cat([pos.new_zeros(1, pos.shape[1]), pos], dim=0)
        return tokens + pos.unsqueeze(0)

    def forward(
        self,
        tokens: torch.Tensor,
        grid: Sequence[int],
        ids_restore: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            tokens: encoder output of the (masked) modality, (B, 1 + L, encoder_size), CLS first, visible
                tokens in ``ids_keep`` order.
            grid: token grid of the full image (prod(grid) = N).
            ids_restore: (B, N) long, position of each raster token in [visible..., masked...] order;
                None when no token was masked (L = N).
            context: the other (unmasked) modality's encoder output on the same grid, (B, 1 + N, encoder_size),
                required with cross-attention; it gets the decoder's position embedding as the queries do.

        Returns:
            predictions for every token, (B, N, patch_dim), raster order.
        """
        x = self.embed(tokens)
        if ids_restore is not None:
            b, n = ids_restore.shape
            visible = x[:, 1:]
            fill = self.mask_token.to(x.dtype).expand(b, n - visible.shape[1], -1)
            full = torch.cat([visible, fill], dim=1)
            full = torch.gather(full, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], full], dim=1)
        x = self._with_pos(x, grid)
        ctx = None
        if self.context_embed is not None:
            if context is None:
                raise ValueError("this decoder has cross-attention: the other modality's tokens are required.")
            if context.shape[1] != x.shape[1]:
                raise ValueError(
                    f"context must hold the other modality's CLS and all {x.shape[1] - 1} tokens of the grid "
                    f"{tuple(grid)}, got {context.shape[1]} tokens."
                )
            ctx = self._with_pos(self.context_embed(context), grid)
        for blk in self.blocks:
            x = blk(x, ctx)
        return self.pred(self.norm(x))[:, 1:]
