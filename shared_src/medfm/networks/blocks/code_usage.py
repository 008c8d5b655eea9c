"""Code-usage statistics of a soft vector quantizer: the entropy of the batch's mean code usage and the mean
per-token entropy (SPAD-Nets, arXiv:2312.07630; reference code PUMIT ``pumit/tokenizer/quantize.py``).

The quantizer returns them with its output; the tokenizer objective (:class:`medfm.losses.SpadVTLoss`) weights them.
"""

from __future__ import annotations

import torch

from medfm.utils.dist import all_gather_cat, is_distributed

__all__ = ["token_entropy", "usage_entropy_loss"]


def _mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over all DDP ranks in value, with the gradient of the local ``x`` (as the reference does).

    The identity outside an initialised process group of more than one rank.
    """
    if not is_distributed():
        return x
    local = x.detach()
    return all_gather_cat(local[None], with_grad=False).mean(0) - local + x


def usage_entropy_loss(probs: torch.Tensor, sync: bool = False) -> torch.Tensor:
    """Negative entropy of the mean code usage: ``sum_k pbar_k log pbar_k`` (float32 scalar).

    Minimising it spreads the batch over the whole codebook (minimum ``-log K`` at uniform usage).

    Args:
        probs: (..., K) code probabilities of every token; ``pbar`` is their mean over all leading dims.
        sync: average ``pbar`` over DDP ranks (all_gather of the detached means, local gradient kept), when a
            process group is initialised.
    """
    pbar = probs.float().reshape(-1, probs.shape[-1]).mean(0)
    if sync:
        pbar = _mean_over_ranks(pbar)
    # clamp only inside the log: 0 * log(tiny) = 0 with a finite gradient where a code is never used
    return (pbar * pbar.clamp_min(torch.finfo(pbar.dtype).tiny).log()).sum()


def token_entropy(x: torch.Tensor, is_logits: bool = True) -> torch.Tensor:
    """Mean over tokens of the entropy ``H(p) = -sum_k p_k log p_k`` of each token's code distribution.

    Args:
        x: (..., K) logits (``is_logits=True``, computed through ``log_softmax``) or probabilities.
        is_logits: whether ``x`` holds logits.
    """
    x = x.float()
    if is_logits:
        log_p = x.log_softmax(-1)
        p = log_p.exp()
    else:
        p = x
        log_p = x.clamp_min(torch.finfo(x.dtype).tiny).log()
    return -(p * log_p).sum(-1).mean()
