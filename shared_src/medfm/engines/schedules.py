"""Per-step schedules shared by the self-distillation pre-trainings (M-IDoL, Pan-FM): DINO's cosine curve and the
scheduled weight decay of an optimizer's decaying parameter groups."""

from __future__ import annotations

import torch

from medfm.losses.self_distill import momentum_schedule

__all__ = ["cosine_schedule", "set_weight_decay"]


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """DINO's cosine schedule: ``start`` at step 0 to ``end`` at ``total_steps`` (and after). Used for the weight
    decay (0.04 -> 0.4) and the EMA momentum (0.996 -> 1); the same curve as :func:`medfm.losses.momentum_schedule`."""
    return momentum_schedule(step, total_steps, start, end)


def set_weight_decay(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set ``value`` on the groups that decay (marked ``wd_schedule`` by their weight decay at first use), so the
    groups built without decay (norms, biases, tokens) stay at 0."""
    for group in optimizer.param_groups:
        if group.setdefault("wd_schedule", float(group.get("weight_decay", 0.0)) > 0):
            group["weight_decay"] = value
