"""Pan-FM downstream model: multi-label disease prediction from the CLS token, fine-tuned or linearly probed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medfm.networks.blocks.linear_probe import ProbedBackbone

from .panfm import PanFMEncoder

__all__ = ["PanFMClassifier"]


class PanFMClassifier(ProbedBackbone):
    """:class:`PanFMEncoder` + a linear head on its normed CLS token, one logit per label (multi-label).

    Missing organs stay missing (their tokens are absent), so the model predicts from whatever organs a
    subject has, in training and at test time.

    Args:
        num_labels: outputs (Pan-FM's protocol: 13 disease categories and 14 single diseases).
        linear_probe: freeze the encoder (no gradient, eval mode) and train the head only.
        dropout: dropout before the head.
        encoder_kwargs: :class:`PanFMEncoder` arguments (``organs``, ``organ_shapes``, ``patch_size``, sizes).
    """

    def __init__(self, num_labels: int, linear_probe: bool = False, dropout: float = 0.0, **encoder_kwargs: Any):
        super().__init__()
        if num_labels < 1:
            raise ValueError(
                f"num_labels must be positive, got {num_labels}: does the subject table have label columns? "
                "Otherwise give the label names (e.g. --label_names \"['a', 'b']\")."
            )
        self.encoder = PanFMEncoder(**encoder_kwargs)
        self.dropout = nn.Dropout(dropout)
        self._init_probe("encoder", self.encoder.hidden_size, num_labels, linear_probe)

    def forward(self, images: Mapping[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """images: organ -> (B, C, *shape); present: (B, O) bool. Returns logits (B, num_labels)."""
        cls = self.features(lambda: self.encoder(images, present).cls)
        return self.head(self.dropout(cls))
