"""M-IDoL downstream models on the 2D Swin backbone: classification (pooled feature -> linear) and segmentation
(Swin stage features -> UNETR-style decoder built from MONAI's blocks)."""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

from medfm.networks.blocks.linear_probe import ProbedBackbone
from medfm.networks.blocks.swin import SwinBackbone

__all__ = ["MIDoLClassifier", "MIDoLSegmenter"]


class MIDoLClassifier(ProbedBackbone):
    """:class:`SwinBackbone` + a linear head on the pooled feature (fine-tuning, or a linear probe with the
    backbone frozen).

    Args:
        num_classes: outputs.
        linear_probe: freeze the backbone (no gradient, eval mode).
        backbone_kwargs: :class:`SwinBackbone` arguments.
    """

    def __init__(self, num_classes: int, linear_probe: bool = False, **backbone_kwargs: Any) -> None:
        super().__init__()
        self.backbone = SwinBackbone(**backbone_kwargs)
        self._init_probe("backbone", self.backbone.num_features, num_classes, linear_probe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) -> logits (B, num_classes)."""
        return self.head(self.features(self.backbone, x))


class MIDoLSegmenter(nn.Module):
    """:class:`SwinBackbone` + a UNETR-style decoder (MONAI ``UnetrUpBlock``s) over the stage maps (Swin-B:
    strides 4, 8, 16, 32) and convolutional stems on the image for the finer levels (Swin-B: strides 1 and 2),
    as MONAI's SwinUNETR does. Output: logits at the input resolution.

    Args:
        out_channels: classes (background included).
        feature_size: channels of the full-resolution levels.
        backbone_kwargs: :class:`SwinBackbone` arguments (``in_channels``, sizes).
    """

    def __init__(self, out_channels: int, feature_size: int = 32, **backbone_kwargs: Any) -> None:
        super().__init__()
        self.backbone = SwinBackbone(**backbone_kwargs)
        dims = [
            self.backbone.num_features // 2 ** (len(self.backbone.layers) - 1 - i)
            for i in range(len(self.backbone.layers))
        ]
        if len(dims) < 2:
            raise ValueError("MIDoLSegmenter needs a backbone of at least 2 stages.")
        in_ch = self.backbone.in_channels
        kw = {"spatial_dims": 2, "kernel_size": 3, "norm_name": "instance", "res_block": True}
        patch = self.backbone.patch_size
        if patch < 2 or patch & (patch - 1):
            raise ValueError(f"MIDoLSegmenter needs a power-of-two patch size >= 2, got {patch}.")
        levels = patch.bit_length() - 1  # image levels below the first stage (stride patch)
        self.stems = nn.ModuleList(
            UnetrBasicBlock(in_channels=in_ch, out_channels=feature_size, stride=2**lvl, **kw) for lvl in range(levels)
        )
        self.up = nn.ModuleList(
            UnetrUpBlock(in_channels=dims[i + 1], out_channels=dims[i], upsample_kernel_size=2, **kw)
            for i in range(len(dims) - 1)
        )  # stage i+1 -> stage i (strides 32 -> 16 -> 8 -> 4)
        self.up_image = nn.ModuleList(
            UnetrUpBlock(in_channels=dims[0] if lvl == levels - 1 else feature_size, out_channels=feature_size,
                         upsample_kernel_size=2, **kw)
            for lvl in range(levels)
        )  # fmt: skip
        self.out = UnetOutBlock(spatial_dims=2, in_channels=feature_size, out_channels=out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_features(x)
        h = feats[-1]
        for i in range(len(feats) - 2, -1, -1):
            h = self.up[i](h, feats[i])
        for lvl in range(len(self.stems) - 1, -1, -1):
            h = self.up_image[lvl](h, self.stems[lvl](x))
        return self.out(h)
