"""FratMAE downstream models: lesion segmentation (UNETR-style decoder) and staging (MLP classifier)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock

from medfm.networks.blocks.trunk import resolve_indices
from medfm.networks.blocks.twin_encoder import evenly_spaced_layers, twin_features, twin_vit_encoders

__all__ = ["FratMAEClassifier", "FratMAESegmenter"]


def _tokens_to_volume(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, 1 + N, C) tokens (CLS first) -> (B, C, *grid)."""
    b, _, c = tokens.shape
    return tokens[:, 1:].transpose(1, 2).reshape(b, c, *grid)


class FratMAESegmenter(nn.Module):
    """Lesion segmentation on FratMAE's twin encoders: PET and CT hidden states concatenated layer-wise at
    ``log2(patch)`` depths feed a UNETR decoder (Hatamizadeh et al., arXiv:2103.10504) built from MONAI's
    UNETR blocks, with a full-resolution convolutional skip from the image.

    With patch 16 and 12 blocks this is UNETR's layout: features of blocks 3, 6, 9 and 12 (1-based), skips at
    1/2, 1/4 and 1/8 resolution and the bottleneck at 1/16; any power-of-two patch size works the same way.

    Args:
        out_channels: segmentation classes (2: background, lesion).
        patch_size: encoder patch size, a power of two >= 4, the same along every axis (the arguments after it are
            keywords).
        feature_size: decoder width at full resolution (UNETR: 16).
        feature_layers: encoder blocks (0-based) giving the skips and the bottleneck, shallowest first;
            ``log2(patch)`` entries (negative ones count from the end; an int ``n``: the last ``n`` blocks; stored
            resolved). Default: evenly spaced, ending with the last block. The last entry is the
            bottleneck: the last block gives the encoder's final normed output (UNETR); an earlier block gives
            that block's output (like the skips) and the deeper blocks are not run (their parameters and the final
            norm then get no gradient: multi-GPU runs need ``find_unused_parameters``).
        norm_name: decoder normalisation.
        res_block: residual decoder blocks.
        encoder_kwargs: the rest of the encoder size, keywords of :class:`~medfm.networks.blocks.ViTEncoder`
            (``hidden_size``, ``num_layers``, ``num_heads``, ``mlp_dim``, ``qkv_bias``, ``drop_path_rate``; ViT-B
            by default).
    """

    def __init__(
        self,
        out_channels: int = 2,
        patch_size: int = 16,
        *,
        feature_size: int = 16,
        feature_layers: Sequence[int] | None = None,
        norm_name: str | tuple = "instance",
        res_block: bool = True,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        levels = int(round(math.log2(patch_size))) if patch_size > 0 else 0
        if patch_size < 4 or 2**levels != patch_size:
            raise ValueError(f"patch_size must be a power of two >= 4, got {patch_size}.")
        self.encoders = twin_vit_encoders(in_channels=1, patch_size=patch_size, **encoder_kwargs)
        num_layers = self.encoders["pet"].num_layers
        if feature_layers is None:
            layers = evenly_spaced_layers(num_layers, levels)
        else:  # the trunk's index convention: negative from the end, an int n for the last n blocks
            try:
                layers = resolve_indices(feature_layers, num_layers)
            except ValueError as e:
                raise ValueError(f"feature_layers: {e}") from None
        if len(layers) != levels:
            raise ValueError(
                f"feature_layers must hold {levels} block indices for patch {patch_size}, got {feature_layers!r}."
            )
        self.feature_layers, self.num_layers = layers, num_layers
        h2 = 2 * self.encoders["pet"].hidden_size
        f = feature_size
        self.stem = UnetrBasicBlock(3, 2, f, kernel_size=3, stride=1, norm_name=norm_name, res_block=res_block)
        # skip j (1..levels-1) at 1/2^j resolution from hidden state j-1
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(3, h2, f * 2**j, num_layer=levels - 1 - j, kernel_size=3, stride=1,
                           upsample_kernel_size=2, norm_name=norm_name, conv_block=True, res_block=res_block)
            for j in range(1, levels)
        )  # fmt: skip
        # decoder j (levels-1 .. 0) upsamples to 1/2^j and merges skip j (the stem for j = 0)
        self.decoders = nn.ModuleList(
            UnetrUpBlock(3, h2 if j == levels - 1 else f * 2 ** (j + 1), f * 2**j, kernel_size=3,
                         upsample_kernel_size=2, norm_name=norm_name, res_block=res_block)
            for j in reversed(range(levels))
        )  # fmt: skip
        self.out = UnetOutBlock(3, f, out_channels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """
        Args:
            image: (B, 2, X, Y, Z), channel 0 PET, channel 1 CT, each size a multiple of the patch size.

        Returns:
            logits (B, out_channels, X, Y, Z).
        """
        if self.feature_layers[-1] == self.num_layers - 1:  # UNETR: the final normed tokens
            final, hidden, grid = twin_features(self.encoders, image, self.feature_layers[:-1])
        else:  # an earlier block's output, without running the deeper blocks
            _, hidden, grid = twin_features(self.encoders, image, self.feature_layers, stop_early=True)
            final = hidden.pop()
        skips = [self.stem(image)] + [blk(_tokens_to_volume(h, grid)) for blk, h in zip(self.skips, hidden)]
        x = _tokens_to_volume(final, grid)
        for dec, skip in zip(self.decoders, reversed(skips)):
            x = dec(x, skip)
        return self.out(x)


class FratMAEClassifier(nn.Module):
    """Whole-body staging classifier on FratMAE's twin encoders: the PET and CT CLS tokens concatenated,
    then an MLP (Oh et al., arXiv:2503.02824, Sec. 2.4.3: Ann Arbor early vs advanced).

    Args:
        num_classes: classes (2: early I/II, advanced III/IV; the arguments after it are keywords).
        mlp_hidden: hidden width of the MLP head.
        dropout: dropout before the last layer.
        encoder_kwargs: encoder size, keywords of :class:`~medfm.networks.blocks.ViTEncoder` (``patch_size``,
            ``hidden_size``, ``num_layers``, ``num_heads``, ``mlp_dim``, ``qkv_bias``, ``drop_path_rate``; ViT-B/16
            by default).
    """

    def __init__(
        self,
        num_classes: int = 2,
        *,
        mlp_hidden: int = 512,
        dropout: float = 0.0,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
        self.encoders = twin_vit_encoders(in_channels=1, **encoder_kwargs)
        hidden_size = self.encoders["pet"].hidden_size
        self.head = nn.Sequential(
            nn.LayerNorm(2 * hidden_size),
            nn.Linear(2 * hidden_size, mlp_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_hidden, num_classes),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, 2, X, Y, Z) PET/CT -> logits (B, num_classes)."""
        final, _, _ = twin_features(self.encoders, image, ())
        return self.head(final[:, 0])
