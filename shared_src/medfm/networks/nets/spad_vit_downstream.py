"""SPAD-ViT downstream models: segmentation (simple feature pyramid + UNet decoder) and classification (CLS)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medfm.networks.blocks.spad import SpadConv3d, SpadConvTranspose3d, SpadDownsample, SpadSequential, default_aniso_d

from .spad_vit import SpadViT

__all__ = ["SpadViTClassifier", "SpadViTSegmenter"]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


def _conv_block(in_ch: int, out_ch: int, stride: int = 1) -> SpadSequential:
    """Two SPAD 3x3x3 convs with GroupNorm + LeakyReLU; the first may stride 2."""
    return SpadSequential(
        SpadConv3d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
        _norm(out_ch),
        nn.LeakyReLU(0.01, inplace=True),
        SpadConv3d(out_ch, out_ch, 3, padding=1, bias=False),
        _norm(out_ch),
        nn.LeakyReLU(0.01, inplace=True),
    )


class SpadViTSegmenter(nn.Module):
    """SPAD-ViT encoder + ViTDet-style simple feature pyramid + UNet decoder with a full-resolution conv stem.

    The features of four blocks (``feature_layers``; the reference: 3, 5, 7, 11 of ViT-B) are reshaped to the
    token grid (level ``p = log2(patch_size)``) and brought to levels ``p-2, p-1, p, p+1`` by two / one SPAD
    transposed convs, identity and a SPAD downsampling. A conv stem gives levels ``0 … p-3`` from the image. The
    UNet decoder climbs from level ``p+1`` to 0, concatenating each level, with SPAD transposed convs that
    upsample depth only where depth was downsampled, so 2D images (``D = 1``) and volumes of any spacing go
    through the same weights. Output: logits (N, out_channels, D, H, W).

    With ``deep_supervision`` (the reference's segmentation model), 1x1 heads on the decoder levels
    ``1 … deep_supervision_heads - 1`` give extra logits, upsampled (trilinearly) to the input size; in training
    ``forward`` then returns the list ``[logits, level-1 logits, …]`` for ``monai.losses.DeepSupervisionLoss``
    with weights :attr:`deep_supervision_weights`, and in evaluation the full-resolution logits alone.

    Args:
        out_channels: classes (background included).
        feature_layers: four block indices feeding the pyramid (negative ones count from the end; an int ``n``: the
            last ``n`` blocks), stored resolved.
        decoder_channels: channels per level 0 … p+1 (``p + 2`` values; the reference's BTCV decoder: 32, 64 in
            the full-resolution stem, 128, 256, 512, 512 on the pyramid levels).
        deep_supervision: add the auxiliary heads and return their logits in training.
        deep_supervision_heads: heads in all, the full-resolution one included (reference: 3).
        encoder_kwargs: everything else goes to :class:`SpadViT` (``in_channels``, ``patch_size``, sizes, …).
    """

    def __init__(
        self,
        out_channels: int,
        feature_layers: Sequence[int] = (3, 5, 7, 11),
        decoder_channels: Sequence[int] = (32, 64, 128, 256, 512, 512),
        deep_supervision: bool = False,
        deep_supervision_heads: int = 3,
        **encoder_kwargs: Any,
    ) -> None:
        super().__init__()
        self.encoder = SpadViT(**encoder_kwargs)
        p = self.encoder.patch_size.bit_length() - 1
        if p < 2:
            raise ValueError(f"SpadViTSegmenter needs patch_size >= 4, got {self.encoder.patch_size}.")
        if len(decoder_channels) != p + 2:
            raise ValueError(
                f"decoder_channels needs {p + 2} values (levels 0..{p + 1}), got {list(decoder_channels)}."
            )
        try:  # the trunk's index convention: negative from the end, an int n for the last n blocks
            layers = self.encoder.blocks.resolve(feature_layers)
        except ValueError as e:
            raise ValueError(f"feature_layers: {e}") from None
        if len(layers) != 4:
            raise ValueError(f"feature_layers must name 4 blocks, got {feature_layers!r}.")
        self.feature_layers = tuple(layers)
        self.patch_level = p
        c = self.encoder.hidden_size
        ch = list(decoder_channels)
        self.feature_norms = nn.ModuleList(nn.LayerNorm(c) for _ in range(4))
        # pyramid: levels p-2, p-1, p, p+1 (ViTDet's simple feature pyramid, SPAD-adaptive)
        self.pyramid = nn.ModuleList(
            [
                SpadSequential(
                    SpadConvTranspose3d(c, c, 2), _norm(c), nn.GELU(), SpadConvTranspose3d(c, c, 2),
                    SpadConv3d(c, ch[p - 2], 1),
                ),
                SpadSequential(SpadConvTranspose3d(c, c, 2), SpadConv3d(c, ch[p - 1], 1)),
                SpadSequential(SpadConv3d(c, ch[p], 1)),
                SpadSequential(SpadDownsample("area"), SpadConv3d(c, ch[p + 1], 1)),
            ]
        )  # fmt: skip
        in_ch = self.encoder.in_channels
        self.stem = nn.ModuleList(
            _conv_block(in_ch if lvl == 0 else ch[lvl - 1], ch[lvl], stride=1 if lvl == 0 else 2)
            for lvl in range(p - 2)
        )
        # decoder: from level p+1 down to 0
        self.up = nn.ModuleList(SpadConvTranspose3d(ch[lvl + 1], ch[lvl], 2) for lvl in range(p + 1))
        self.fuse = nn.ModuleList(_conv_block(2 * ch[lvl], ch[lvl]) for lvl in range(p + 1))
        self.head = SpadConv3d(ch[0], out_channels, 1)
        if deep_supervision and not 2 <= int(deep_supervision_heads) <= p + 1:
            raise ValueError(f"deep_supervision_heads must be in [2, {p + 1}], got {deep_supervision_heads}.")
        num_aux = int(deep_supervision_heads) - 1 if deep_supervision else 0
        self.aux_heads = nn.ModuleList(SpadConv3d(ch[lvl], out_channels, 1) for lvl in range(1, 1 + num_aux))

    @property
    def deep_supervision_weights(self) -> list[float]:
        """Loss weight per head, full resolution first: ``0.5 ** i`` normalised to sum 1 (the reference's)."""
        w = [0.5**i for i in range(1 + len(self.aux_heads))]
        return [v / sum(w) for v in w]

    def forward(self, x: torch.Tensor, aniso_d: int | None = None) -> torch.Tensor | list[torch.Tensor]:
        """x: (N, C, D, H, W) -> logits (N, out_channels, D, H, W); a list of such logits (full resolution first)
        in training with deep supervision."""
        aniso_d = default_aniso_d(x, aniso_d)
        p = self.patch_level
        _, feats = self.encoder.forward_intermediates(x, self.feature_layers, aniso_d=aniso_d)
        grid = self.encoder.token_grid(x, aniso_d)
        skips: dict[int, torch.Tensor] = {}
        for i, (feat, norm, block) in enumerate(zip(feats, self.feature_norms, self.pyramid)):
            fmap = norm(feat[:, 1:]).transpose(1, 2).reshape(feat.shape[0], -1, *grid)
            skips[p - 2 + i] = block(fmap, aniso_d, p)
        h = x
        if self.encoder.input_mean is not None:
            h = (h - self.encoder.input_mean) / self.encoder.input_std
        for lvl, block in enumerate(self.stem):
            h = block(h, aniso_d, max(lvl - 1, 0))
            skips[lvl] = h
        h = skips[p + 1]
        aux: list[torch.Tensor] = []
        for lvl in range(p, -1, -1):
            h = self.up[lvl](h, aniso_d, lvl + 1)
            h = self.fuse[lvl](torch.cat((h, skips[lvl]), dim=1), aniso_d, lvl)
            if self.training and 1 <= lvl <= len(self.aux_heads):
                logits = self.aux_heads[lvl - 1](h, aniso_d, lvl)
                aux.insert(0, F.interpolate(logits, size=x.shape[2:], mode="trilinear", align_corners=False))
        out = self.head(h, aniso_d, 0)
        return [out, *aux] if aux else out


class SpadViTClassifier(nn.Module):
    """SPAD-ViT encoder + linear head on the normed CLS token (the reference's MedMNIST protocol).

    Args:
        num_classes: output logits.
        dropout: dropout before the head.
        encoder_kwargs: everything else goes to :class:`SpadViT`.
    """

    def __init__(self, num_classes: int, dropout: float = 0.0, **encoder_kwargs: Any) -> None:
        super().__init__()
        self.encoder = SpadViT(**encoder_kwargs)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.hidden_size, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, aniso_d: int | None = None) -> torch.Tensor:
        return self.head(self.dropout(self.encoder(x, aniso_d)[:, 0]))
