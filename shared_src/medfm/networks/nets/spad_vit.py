"""SPAD-ViT (Luo et al., SPAD-Nets): one EVA-02-style ViT for 2D images and 3D volumes of any spacing, and its
masked-image-modelling (MIM) pre-training model.

Inputs are ``(N, C, D, H, W)`` images in [0, 1] (2D images have ``D = 1``) with one anisotropy level
``aniso_d`` per batch (see :mod:`medfm.networks.blocks.spad`). The patch embedding is a SPAD convolution with
kernel = stride = ``patch_size``: in-plane patches are always ``patch_size`` wide, the depth patch is
``patch_size >> aniso_d`` slices (1 for 2D). Positions: a learnable 3D embedding resampled to the token grid
plus SPAD-ViT's 3D RoPE in every attention layer.

Parameter names follow the authors' released ViT (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.<i>.{norm1,attn,norm2,mlp}``, ``norm``, ``mask_token``, ``mim_head``) except where we fuse
projections (``attn.qkv`` = q/k/v, ``mlp.fc1`` = w1/w2); ``tools/convert_pumit.py`` maps the release onto these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfm.networks.blocks.eva_block import eva_block
from medfm.networks.blocks.rope import Rope3D
from medfm.networks.blocks.sizes import SPAD_VIT_SIZES, resolve_size
from medfm.networks.blocks.spad import SpadConv3d, default_aniso_d
from medfm.networks.blocks.trunk import TransformerTrunk
from medfm.networks.blocks.vit_encoder import init_trunc_normal_weights

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SpadViT", "SpadViTMIM", "resample_pos_embed"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resample_pos_embed(pos_embed: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Resample a (1, C, d, h, w) embedding to ``grid``: area-average where it shrinks, trilinear where it grows."""
    grid = tuple(int(g) for g in grid)
    down = tuple(min(a, b) for a, b in zip(pos_embed.shape[2:], grid))
    if down != tuple(pos_embed.shape[2:]):
        pos_embed = F.interpolate(pos_embed, size=down, mode="area")
    if down != grid:
        pos_embed = F.interpolate(pos_embed, size=grid, mode="trilinear", align_corners=False)
    return pos_embed


class _PatchEmbed(nn.Module):
    """SPAD conv patch embedding kept under ``patch_embed.proj`` (the release's key names)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = SpadConv3d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor, aniso_d: int) -> torch.Tensor:
        return self.proj(x, aniso_d, 0)


class SpadViT(nn.Module):
    """SPAD-ViT encoder. Defaults are ViT-B as released (768 wide, 12 blocks, 12 heads, SwiGLU 2048).

    Args:
        in_channels: image channels (the release: 3, grey images replicated).
        patch_size: in-plane patch size; must be a power of two (16).
        hidden_size, num_layers, num_heads, mlp_dim: transformer sizes; None takes the ``size``'s.
        pos_embed_shape: shape (d, h, w) of the learnable position embedding (5, 10, 10: the pre-training grid).
        rope_base_z, rope_base_xy: 3D RoPE frequency bases (2333, 10000).
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        input_mean, input_std: per-channel input normalisation applied inside (ImageNet's, as the release);
            None leaves inputs as they come.
        grad_checkpointing: recompute blocks in backward to save memory.
        size: a name of :data:`~medfm.networks.blocks.SPAD_VIT_SIZES` (``base``: the release) or a mapping of the
            four transformer sizes, for those passed as None.
    """

    def __init__(
        self,
        in_channels: int = 3,
        patch_size: int = 16,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        num_heads: int | None = None,
        mlp_dim: int | None = None,
        pos_embed_shape: Sequence[int] = (5, 10, 10),
        rope_base_z: float = 2333.0,
        rope_base_xy: float = 10000.0,
        drop_path_rate: float = 0.0,
        input_mean: Sequence[float] | None = IMAGENET_MEAN,
        input_std: Sequence[float] | None = IMAGENET_STD,
        grad_checkpointing: bool = False,
        size: str | Mapping[str, int] = "base",
    ) -> None:
        super().__init__()
        hidden_size, num_layers, num_heads, mlp_dim = resolve_size(
            SPAD_VIT_SIZES, size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim
        ).values()
        if patch_size < 1 or patch_size & (patch_size - 1):
            raise ValueError(f"patch_size must be a power of two, got {patch_size}.")
        if (input_mean is None) != (input_std is None):
            raise ValueError("give both input_mean and input_std, or neither.")
        if input_mean is not None and not len(input_mean) == len(input_std) == in_channels:
            raise ValueError(f"input_mean/input_std need {in_channels} values (one per channel).")
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.patch_embed = _PatchEmbed(in_channels, hidden_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, hidden_size, *pos_embed_shape))
        self.rope = Rope3D(hidden_size // num_heads, rope_base_z, rope_base_xy)
        self.blocks = TransformerTrunk(
            lambda r: eva_block(hidden_size, num_heads, mlp_dim, drop_path=r), num_layers, drop_path_rate
        )
        self.blocks.set_grad_checkpointing(grad_checkpointing)
        self.norm = nn.LayerNorm(hidden_size)
        if input_mean is not None:
            shape = (1, in_channels, 1, 1, 1)
            self.register_buffer("input_mean", torch.tensor(input_mean).view(shape), persistent=False)
            self.register_buffer("input_std", torch.tensor(input_std).view(shape), persistent=False)
        else:
            self.input_mean = self.input_std = None
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_trunc_normal_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, about a third more compute)."""
        self.blocks.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (tokens, position embedding, q/v biases)."""
        names = {"cls_token", "pos_embed"}
        return names | {n for n, _ in self.named_parameters() if n.endswith(("q_bias", "v_bias"))}

    def token_grid(self, x: torch.Tensor, aniso_d: int) -> tuple[int, int, int]:
        """Token grid of an input, with a clear error when the input does not tile into patches."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, D, H, W), got {tuple(x.shape)}.")
        patch = (max(self.patch_size >> aniso_d, 1), self.patch_size, self.patch_size)
        if any(s % p for s, p in zip(x.shape[2:], patch)):
            raise ValueError(
                f"input of spatial shape {tuple(x.shape[2:])} does not tile into patches {patch} "
                f"(aniso_d={aniso_d}); crop or pad it to a multiple."
            )
        return tuple(s // p for s, p in zip(x.shape[2:], patch))  # type: ignore[return-value]

    def embed(self, x: torch.Tensor, aniso_d: int | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Normalised input -> patch tokens (N, L, C) with the position embedding added, and the grid."""
        aniso_d = default_aniso_d(x, aniso_d)
        grid = self.token_grid(x, aniso_d)
        if self.input_mean is not None:
            x = (x - self.input_mean) / self.input_std
        tokens = self.patch_embed(x, aniso_d)
        tokens = tokens + resample_pos_embed(self.pos_embed, grid).to(tokens.dtype)
        return tokens.flatten(2).transpose(1, 2), grid

    def encode(
        self, tokens: torch.Tensor, grid: Sequence[int], indices: int | Sequence[int] = (), stop_early: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Prepend CLS and run the blocks on embedded tokens (N, L, C) of the token ``grid``.

        Returns:
            the normed sequence (N, 1+L, C) and the raw outputs (N, 1+L, C) of the blocks in ``indices`` (see
            :func:`~medfm.networks.blocks.resolve_indices`; out-of-range indices are a ValueError).
        """
        self.blocks.resolve(indices)
        x = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens), dim=1)
        x, kept = self.blocks(x, indices, stop_early=stop_early, rope=self.rope(grid))
        return self.norm(x), kept

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] = (),
        *,
        aniso_d: int | None = None,
        stop_early: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The contract of :mod:`medfm.networks.blocks.trunk`.

        Args:
            x: (N, C, D, H, W).
            indices: block indices (negative from the end) or a count of last blocks.
            aniso_d: anisotropy level (None: from the input's depth, see ``default_aniso_d``).
            stop_early: run only up to the deepest requested block.

        Returns:
            normed final sequence (N, 1+L, C) and the outputs (N, 1+L, C) of blocks ``indices``, in that order.
        """
        self.blocks.resolve(indices)
        tokens, grid = self.embed(x, aniso_d)
        return self.encode(tokens, grid, indices, stop_early)

    def forward(self, x: torch.Tensor, aniso_d: int | None = None) -> torch.Tensor:
        """Normed token sequence (N, 1+L, C); index 0 is CLS."""
        return self.forward_intermediates(x, aniso_d=aniso_d)[0]


class SpadViTMIM(SpadViT):
    """SPAD-ViT with a mask token and the MIM head ``Linear(C, C) - GELU - Linear(C, num_codes)``.

    Masked patch tokens are replaced by the mask token before the first block (the released ViT-B feeds mask
    tokens from the input on), so every block sees the whole grid.

    ``forward(x, aniso_d, mask)`` with ``mask`` (N, L) True where masked returns
    ``{"logits": (M, num_codes) at the masked tokens in row-major order, "mask": mask}``.
    """

    def __init__(self, num_codes: int = 1024, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        c = self.hidden_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.mim_head = nn.Sequential(nn.Linear(c, c), nn.GELU(), nn.Linear(c, num_codes))
        self.mim_head.apply(init_trunc_normal_weights)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, aniso_d: int | None = None, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor] | torch.Tensor:
        if mask is None:
            return super().forward(x, aniso_d)
        tokens, grid = self.embed(x, aniso_d)
        if mask.shape != tokens.shape[:2]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match the token grid {grid}.")
        tokens = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)
        final, _ = self.encode(tokens, grid)
        return {"logits": self.mim_head(final[:, 1:][mask]), "mask": mask}
