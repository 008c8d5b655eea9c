"""M-IDoL downstream models on the 2D Swin backbone: classification (pooled feature -> linear) and segmentation
(Swin stage features -> UNETR-style decoder built from MONAI's blocks)."""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

from medfm.networks.blocks.swin import SwinBackbone

__all__ = ["MIDoLClassifier", "MIDoLSegmenter"]


class MIDoLClassifier(nn.Module):
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
        self.linear_probe = linear_probe
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        if linear_probe:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> MIDoLClassifier:
        super().train(mode)
        if self.linear_probe:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear_probe:
            with torch.no_grad():
                feats = self.backbone(x)
        else:
            feats = self.backbone(x)
        return self.head(feats)


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
