"""Organ-level masking for Pan-FM: uniform random and saliency-guided (SGM).

Pan-FM (Wu et al., arXiv:2605.07055) masks whole organs and, with SGM, favours the organs the teacher's CLS
attends to most, so the student cannot lean on the dominant organs (adipose, heart). The sampling rule is our
proposal (``notes/METHODS.md`` section 3, after AttMask and DropMAE): with teacher attention shares ``a_o``
over the present organs, ``p_o = (1 - floor) a_o + floor / |present|``, where ``a_o`` is the organ's *mean*
attention per token, normalised over the present organs (:func:`organ_attention_share`: a sum over the organ's
tokens would measure its size, not the model's reliance on it); each subject masks
``m = round(r |present|)`` organs, ``r ~ U(ratio_range)``, at most ``|present| - 1`` (one organ always stays
visible; a subject with a single organ is never masked at organ level), drawn without replacement from ``p``.

Masks are ``(B, O)`` bool, True = masked organ, drawn on the inputs' device from the given generator.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "SUPPORTED_ORGAN_MASKING",
    "organ_attention_share",
    "organ_masking",
    "random_organ_mask",
    "sample_organ_mask",
    "sgm_probabilities",
]

SUPPORTED_ORGAN_MASKING = ("random", "sgm", "mix")


def _check_present(present: torch.Tensor) -> None:
    if present.dtype != torch.bool or present.ndim != 2:
        raise ValueError(f"present must be a (B, O) bool tensor, got {present.dtype} {tuple(present.shape)}.")
    empty = (~present.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"subject(s) at batch index {empty} have no present organ.")


def _check_ratio_range(ratio_range: tuple[float, float]) -> tuple[float, float]:
    lo, hi = (float(r) for r in ratio_range)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"ratio_range must satisfy 0 <= low <= high <= 1, got {tuple(ratio_range)}.")
    return lo, hi


def organ_attention_share(
    token_attention: torch.Tensor, token_organ: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """Token-normalised attention share per organ: each present organ's mean attention per token, normalised over
    the present organs. Uniform attention per token gives every present organ ``1 / |present|`` whatever its token
    count; an organ gets a larger share only if the model attends to its tokens more.

    Args:
        token_attention: (B, L) non-negative attention per token (e.g. the CLS row, mean over heads).
        token_organ: (B, L) long, organ index of each token, -1 for padding (ignored).
        present: (B, O) bool.

    Returns:
        (B, O) float32, summing to 1 over the present organs (uniform where they get no attention), 0 on missing.
    """
    if token_attention.shape != token_organ.shape or token_attention.ndim != 2:
        raise ValueError(
            f"token_attention {tuple(token_attention.shape)} and token_organ {tuple(token_organ.shape)} must be the "
            "same (B, L) shape."
        )
    if present.ndim != 2 or present.shape[0] != token_attention.shape[0]:
        raise ValueError(f"present must be (B, O) with B = {token_attention.shape[0]}, got {tuple(present.shape)}.")
    b, o = present.shape
    if int(token_organ.max()) >= o:
        raise ValueError(f"token_organ holds organ index {int(token_organ.max())}, but present has {o} organs.")
    a = token_attention.float().clamp_min(0)
    idx = token_organ.long() + 1  # column 0 collects the padding
    sums = a.new_zeros(b, o + 1).scatter_add_(1, idx, a)[:, 1:]
    counts = a.new_zeros(b, o + 1).scatter_add_(1, idx, torch.ones_like(a))[:, 1:]
    pf = present.float()
    mean = sums / counts.clamp_min(1) * pf
    total = mean.sum(1, keepdim=True)
    return torch.where(total > 0, mean / total.clamp_min(1e-30), pf / pf.sum(1, keepdim=True).clamp_min(1))


def sgm_probabilities(attention: torch.Tensor, present: torch.Tensor, floor: float = 0.2) -> torch.Tensor:
    """Masking probabilities from the teacher's per-organ attention.

    Args:
        attention: (B, O) non-negative, token-normalised attention share per organ
            (:func:`organ_attention_share`; renormalised here over the present organs, a row with no attention on
            any present organ becomes uniform).
        present: (B, O) bool, every row with at least one True.
        floor: lambda in [0, 1], the uniform share: 0 follows the attention alone, 1 is uniform.

    Returns:
        (B, O) float32, ``(1 - floor) a_o + floor / |present|`` on present organs, 0 on missing; rows sum to 1.
    """
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1], got {floor}.")
    _check_present(present)
    if attention.shape != present.shape:
        raise ValueError(f"attention {tuple(attention.shape)} and present {tuple(present.shape)} differ in shape.")
    pf = present.float()
    n = pf.sum(1, keepdim=True)
    a = attention.float().clamp_min(0) * pf
    total = a.sum(1, keepdim=True)
    a = torch.where(total > 0, a / total.clamp_min(1e-12), pf / n)
    return ((1.0 - floor) * a + floor / n) * pf


def sample_organ_mask(
    probs: torch.Tensor,
    present: torch.Tensor,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mask ``m = round(r |present|)`` organs per subject (r ~ U(ratio_range), m clamped to [0, |present| - 1]),
    drawn without replacement with probabilities proportional to ``probs`` (Gumbel top-k, which is the same law
    as drawing one organ after another and renormalising). Rounding is half-to-even, like Python's ``round``.

    Args:
        probs: (B, O) non-negative weights (only their ratios over present organs matter).
        present: (B, O) bool.
        ratio_range: range of the masking ratio r.
        generator: random generator on the inputs' device, or None for the global one.

    Returns:
        (B, O) bool, True = masked; never a missing organ, never every present organ.
    """
    _check_present(present)
    lo, hi = _check_ratio_range(ratio_range)
    if probs.shape != present.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and present {tuple(present.shape)} differ in shape.")
    b, o = present.shape
    device = present.device
    n = present.sum(1)
    r = lo + (hi - lo) * torch.rand(b, generator=generator, device=device)
    m = torch.minimum(torch.round(r * n).long(), n - 1)
    u = torch.rand(b, o, generator=generator, device=device).clamp(1e-12, 1.0 - 1e-7)
    gumbel = -torch.log(-torch.log(u))
    keys = torch.log(probs.float().clamp_min(1e-30)) + gumbel
    keys = keys.masked_fill(~present, float("-inf"))
    rank = keys.argsort(1, descending=True).argsort(1)  # rank[b, o]: place of organ o in the draw order
    return (rank < m.unsqueeze(1)) & present


def random_organ_mask(
    present: torch.Tensor, ratio_range: tuple[float, float] = (0.1, 0.5), generator: torch.Generator | None = None
) -> torch.Tensor:
    """:func:`sample_organ_mask` with uniform probabilities over the present organs."""
    return sample_organ_mask(present.float(), present, ratio_range, generator)


def organ_masking(
    mode: Literal["random", "sgm", "mix"],
    attention: torch.Tensor | None,
    present: torch.Tensor,
    sgm_fraction: float = 0.5,
    floor: float = 0.2,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Organ masks of one batch.

    Args:
        mode: ``"random"`` uniform organ masking; ``"sgm"`` saliency-guided for every subject; ``"mix"`` SGM for
            each subject with probability ``sgm_fraction`` (drawn from ``generator``), uniform for the others.
        attention: (B, O) teacher's token-normalised attention share per organ; needed by ``"sgm"`` and ``"mix"``.
        present: (B, O) bool.
        sgm_fraction: expected fraction of subjects masked by SGM in ``"mix"`` mode.
        floor: lambda of :func:`sgm_probabilities`.
        ratio_range: range of the per-subject masking ratio.
        generator: random generator on ``present``'s device.

    Returns:
        (B, O) bool, True = masked organ.
    """
    if mode not in SUPPORTED_ORGAN_MASKING:
        raise ValueError(f"mode must be one of {SUPPORTED_ORGAN_MASKING}, got {mode!r}.")
    if not 0.0 <= sgm_fraction <= 1.0:
        raise ValueError(f"sgm_fraction must be in [0, 1], got {sgm_fraction}.")
    if mode == "random":
        return random_organ_mask(present, ratio_range, generator)
    if attention is None:
        raise ValueError(f"masking mode {mode!r} needs the teacher's organ attention.")
    probs = sgm_probabilities(attention, present, floor)
    if mode == "mix":
        use_sgm = torch.rand(present.shape[0], generator=generator, device=present.device) < sgm_fraction
        probs = torch.where(use_sgm.unsqueeze(1), probs, present.float())
    return sample_organ_mask(probs, present, ratio_range, generator)
