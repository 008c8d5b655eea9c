"""InfoNCE contrastive loss between paired embeddings (CLIP-style), over the global batch."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from medfm.utils.dist import all_gather_cat

__all__ = ["InfoNCELoss", "duplicate_pairs"]


def duplicate_pairs(groups: torch.Tensor) -> torch.Tensor:
    """(N, N) bool: ``True`` where rows ``i != j`` carry the same group (e.g. the same prompt token ids).

    Args:
        groups: (N,) group ids or (N, L) rows compared whole (token ids of each sample's prompt).
    """
    g = groups.reshape(groups.shape[0], -1)
    same = (g[:, None, :] == g[None, :, :]).all(-1)
    return same & ~torch.eye(g.shape[0], dtype=torch.bool, device=g.device)


class InfoNCELoss(nn.Module):
    """InfoNCE (van den Oord et al., arXiv:1807.03748) as CLIP uses it (Radford et al., arXiv:2103.00020).

    With L2-normalised embeddings a_i, b_j and temperature tau, the image-to-text term is
    ``-mean_i log softmax_j(a_i . b_j / tau)[i]`` — FratMAE's Eq. (4), whose sum runs over the whole batch N (24
    over 8 GPUs in the paper): under DDP the embeddings are gathered from every rank (with their gradients, see
    :func:`medfm.utils.all_gather_cat`), so every rank computes the loss of the global batch and a multi-process
    run gives the loss of one process on the whole batch. ``symmetric=True`` averages it with the text-to-image
    term, as CLIP does.

    Samples with identical text (``groups``) are not each other's negatives: a pair ``i != j`` of one group is
    left out of both softmax denominators (the positive ``i == i`` stays), as contrastive losses over repeated
    captions do. A batch whose samples all share one text then contributes 0 (no negative left) rather than the
    constant ``log N`` of an unmasked loss.

    Args:
        temperature: tau (CLIP initialises 0.07).
        symmetric: average both directions.
        learnable_temperature: learn log(1/tau), clamped to 1/tau <= 100 as in CLIP.
        gather: gather the embeddings over DDP ranks (no effect outside a process group).
    """

    def __init__(self, temperature: float = 0.07, symmetric: bool = True, learnable_temperature: bool = False,
                 gather: bool = True) -> None:  # fmt: skip
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.symmetric = symmetric
        self.gather = gather
        scale = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_scale = nn.Parameter(scale)
        else:
            self.register_buffer("log_scale", scale)

    def forward(self, a: torch.Tensor, b: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            a: (N, D) embeddings (e.g. PET CLS after projection).
            b: (N, D) paired embeddings (e.g. text); row i of a pairs with row i of b.
            groups: (N,) or (N, L) per-sample group keys (e.g. prompt token ids); rows equal in full are
                duplicates and not used as negatives. None: every other sample is a negative.

        Returns:
            the scalar loss (float32) of the global batch.
        """
        if a.ndim != 2 or a.shape != b.shape:
            raise ValueError(f"expected two (N, D) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
        if groups is not None and groups.shape[0] != a.shape[0]:
            raise ValueError(f"groups must have one row per sample ({a.shape[0]}), got shape {tuple(groups.shape)}.")
        a = F.normalize(a.float(), dim=-1)
        b = F.normalize(b.float(), dim=-1)
        if self.gather:
            a, b = all_gather_cat(a), all_gather_cat(b)
            groups = None if groups is None else all_gather_cat(groups, with_grad=False)
        logits = a @ b.t() * self.log_scale.clamp(max=math.log(100.0)).exp()
        if groups is not None:
            logits = logits.masked_fill(duplicate_pairs(groups), float("-inf"))
        labels = torch.arange(a.shape[0], device=a.device)
        loss = F.cross_entropy(logits, labels)
        if self.symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.t(), labels))
        return loss
