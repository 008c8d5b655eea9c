"""Optimizer parameter groups."""

from __future__ import annotations

from torch import nn

from .dist import unwrap

__all__ = ["weight_decay_groups"]


def _no_decay_names(module: nn.Module) -> set[str]:
    """Names that modules (at any depth) list in ``no_weight_decay()``, made relative to ``module``."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        fn = getattr(sub, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decay on weight matrices and kernels; none on biases, norm scales, other 1-D
    parameters and what a module names in ``no_weight_decay()`` (tokens, position embeddings, codebooks) —
    the convention of timm, BEiT and EVA-02 (and of the SPAD-Nets reference code). ``module.`` (DDP) is seen
    through. Frozen parameters are left out."""
    inner = unwrap(module)
    skip = _no_decay_names(inner)
    decay, no_decay = [], []
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
