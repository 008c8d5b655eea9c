"""Mean squared error on masked tokens only (MAE's reconstruction loss)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MaskedMSELoss", "masked_mse"]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = False) -> torch.Tensor:
    """Per-token MSE averaged over masked tokens, in float32.

    Args:
        pred: (B, N, P) predicted patches.
        target: (B, N, P) true patches (see :func:`medfm.networks.blocks.patchify`).
        mask: (B, N) bool, True = masked; only these tokens count.
        norm_pix: normalise each target patch to zero mean / unit variance first (MAE's ``norm_pix_loss``).
    """
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and mask {tuple(mask.shape)} do not match."
        )
    pred, target = pred.float(), target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_token = (pred - target).pow(2).mean(dim=-1)
    w = mask.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1.0)


class MaskedMSELoss(nn.Module):
    """Module form of :func:`masked_mse`."""

    def __init__(self, norm_pix: bool = False) -> None:
        super().__init__()
        self.norm_pix = norm_pix

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mse(pred, target, mask, self.norm_pix)
