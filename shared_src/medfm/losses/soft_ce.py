"""Soft-label cross-entropy of SPAD-ViT's masked image modelling."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SoftTokenCELoss", "soft_cross_entropy"]


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_k p_k log softmax(logits)_k`` (float32 whatever the input precision)."""
    if logits.shape != target_probs.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(target_probs.shape)} differ in shape.")
    if logits.numel() == 0:
        raise ValueError("no masked token to compute the MIM loss on.")
    return -(target_probs.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


class SoftTokenCELoss(nn.Module):
    """MIM loss: the ViT's logits at the masked tokens against the frozen tokenizer's soft tokens.

    ``preds`` is :class:`medfm.networks.nets.SpadViTMIM`'s output ``{"logits": (M, K), "mask": (N, L)}``;
    ``targets`` holds ``"probs"`` (N, L, K), the tokenizer's ``softmax(logits)`` for every token.
    ``forward_terms`` also reports the KL divergence (the loss minus the targets' entropy), a scale-free
    measure of how far the prediction is from the soft token.
    """

    def forward_terms(self, preds: dict[str, torch.Tensor], targets: dict[str, Any]) -> dict[str, torch.Tensor]:
        target = targets["probs"][preds["mask"]]
        ce = soft_cross_entropy(preds["logits"], target)
        with torch.no_grad():
            t = target.float()
            entropy = -(t * t.clamp_min(1e-12).log()).sum(-1).mean()
        return {"loss": ce, "kld": ce.detach() - entropy}

    def forward(self, preds: dict[str, torch.Tensor], targets: dict[str, Any]) -> torch.Tensor:
        return self.forward_terms(preds, targets)["loss"]
