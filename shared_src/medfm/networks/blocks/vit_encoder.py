"""ViT encoder for 2D/3D images that takes the indices of the tokens to keep (MAE-style)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from .patch_embed import PatchEmbed, token_grid
from .pos_embed import sincos_pos_embed
from .sizes import VIT_SIZES, resolve_size
from .transformer_block import TransformerBlock
from .trunk import TransformerTrunk

__all__ = ["VIT_SIZES", "ViTEncoder", "init_transformer_weights", "init_trunc_normal_weights"]


def init_transformer_weights(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def init_trunc_normal_weights(module: nn.Module) -> None:
    """Swin / EVA-02 initialisation: truncated-normal (std 0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class ViTEncoder(nn.Module):
    """Vision Transformer encoder (Dosovitskiy et al., arXiv:2010.11929) as used by MAE (He et al.,
    arXiv:2111.06377): patch embedding, fixed sine-cosine position embedding computed from the token grid,
    CLS token, pre-norm blocks with SDPA attention (a :class:`~medfm.networks.blocks.TransformerTrunk`), final
    LayerNorm.

    Masked tokens never enter: pass ``ids_keep`` and only those tokens are embedded and encoded.

    All arguments are keywords (sizes by name: ``size``, :data:`VIT_SIZES`).

    Args:
        in_channels: image channels.
        patch_size: patch size (int or per spatial dim).
        hidden_size: token width (ViT-B: 768); None takes the ``size``'s.
        num_layers: blocks (ViT-B: 12); None takes the ``size``'s.
        num_heads: heads (ViT-B: 12); None takes the ``size``'s.
        mlp_dim: MLP width (ViT-B: 3072); None takes the ``size``'s.
        qkv_bias: bias on q, k, v.
        drop_path_rate: stochastic depth, linearly increasing over blocks up to this rate.
        spatial_dims: 2 or 3.
        size: a name of :data:`VIT_SIZES` (``base``: ViT-B) or a mapping of the four size keywords, for those
            passed as None.
    """

    def __init__(
        self,
        *,
        in_channels: int = 1,
        patch_size: int | Sequence[int] = 16,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        mlp_dim: int | None = None,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        spatial_dims: int = 3,
        size: str | Mapping[str, int] = "base",
    ) -> None:
        super().__init__()
        hidden_size, num_layers, num_heads, mlp_dim = resolve_size(
            VIT_SIZES, size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim
        ).values()
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}.")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.patch_embed = PatchEmbed(in_channels, hidden_size, patch_size, spatial_dims)
        self.patch_size = self.patch_embed.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.blocks = TransformerTrunk(
            lambda r: TransformerBlock(hidden_size, num_heads, mlp_dim, qkv_bias=qkv_bias, drop_path=r),
            num_layers,
            drop_path_rate,
        )
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        for m in (self.blocks, self.norm):
            m.apply(init_transformer_weights)
        nn.init.normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameter names that an optimiser should not decay."""
        return {"cls_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        self.blocks.set_grad_checkpointing(enable)

    def token_grid(self, x: torch.Tensor) -> tuple[int, ...]:
        """Token grid of an image (B, C, *spatial)."""
        return token_grid(x.shape[2:], self.patch_size)

    def embed(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Tokens with position embedding and CLS: (B, 1 + L, hidden_size), and the token grid."""
        tokens, grid = self.patch_embed(x, ids_keep)
        pos = sincos_pos_embed(grid, self.hidden_size, device=tokens.device, dtype=tokens.dtype)
        pos = pos.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        if ids_keep is not None:
            pos = torch.gather(pos, 1, ids_keep.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
        tokens = tokens + pos
        cls = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1), grid

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] = (),
        *,
        ids_keep: torch.Tensor | None = None,
        stop_early: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the encoder and keep the outputs of the blocks in ``indices`` (the contract of
        :mod:`medfm.networks.blocks.trunk`).

        Args:
            x: (B, C, *spatial).
            indices: block indices (0-based; negative counts from the end) or a count of last blocks.
            ids_keep: (B, L) indices of the tokens to keep, or None for all.
            stop_early: run only up to the deepest requested block; the first return value is then the final
                norm applied to that block's output (callers that stop early normally use the intermediates).

        Returns:
            final normed tokens (B, 1 + L, hidden_size) and the requested block outputs (B, 1 + L, hidden_size)
            in the order asked.
        """
        self.blocks.resolve(indices)  # bad indices fail before any work
        h, _ = self.embed(x, ids_keep)
        h, kept = self.blocks(h, indices, stop_early=stop_early)
        return self.norm(h), kept

    def forward_features(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """
        Args:
            x: (B, C, *spatial), spatial sizes multiples of the patch size.
            ids_keep: (B, L) long indices (raster order) of visible tokens; None keeps all N.

        Returns:
            ``tokens`` (B, 1 + L, hidden_size) normed, CLS first; ``cls`` (B, hidden_size).
        """
        tokens, _ = self.forward_intermediates(x, ids_keep=ids_keep)
        return {"tokens": tokens, "cls": tokens[:, 0]}

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.forward_features(x, ids_keep)
