"""InfoNCE contrastive loss between paired embeddings (CLIP-style)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["InfoNCELoss"]


class InfoNCELoss(nn.Module):
    """InfoNCE (van den Oord et al., arXiv:1807.03748) as CLIP uses it (Radford et al., arXiv:2103.00020).

    With L2-normalised embeddings a_i, b_j and temperature tau, the image-to-text term is
    ``-mean_i log softmax_j(a_i . b_j / tau)[i]`` — FratMAE's Eq. (4); ``symmetric=True`` averages it with
    the text-to-image term, as CLIP does.

    Args:
        temperature: tau (CLIP initialises 0.07).
        symmetric: average both directions.
        learnable_temperature: learn log(1/tau), clamped to 1/tau <= 100 as in CLIP.
    """

    def __init__(self, temperature: float = 0.07, symmetric: bool = True, learnable_temperature: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.symmetric = symmetric
        scale = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_scale", scale)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """
        Args:
            a: (N, D) embeddings (e.g. PET CLS after projection).
            b: (N, D) paired embeddings (e.g. text); row i of a pairs with row i of b.
        """
        if a.ndim != 2 or a.shape != b.shape:
            raise ValueError(f"expected two (N, D) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
        a = F.normalize(a.float(), dim=-1)
        b = F.normalize(b.float(), dim=-1)
        logits = a @ b.t() * self.log_scale.clamp(max=math.log(100.0)).exp()
        labels = torch.arange(a.shape[0], device=a.device)
        loss = F.cross_entropy(logits, labels)
        if self.symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.t(), labels))
        return loss
