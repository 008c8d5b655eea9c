"""Distributed helpers: the process group's state and cross-rank gathers that keep or drop gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_gather_cat", "is_distributed"]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_cat(x: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) over the ranks along dim 0, in rank order.

    With ``with_grad`` the gather is differentiable (``torch.distributed.nn``): the backward pass sends each rank
    the SUM over ranks of the gradients of its rows. A loss computed identically on every rank from the gathered
    tensor therefore gives each rank ``world_size`` times its rows' gradient, which DDP's averaging turns into
    the gradient of the one global loss. Outside a process group (or with one rank) ``x`` is returned as is.

    Args:
        x: (B, ...) this rank's rows.
        with_grad: keep the gradient path (False: a plain ``all_gather``, detached).

    Returns:
        (world_size * B, ...).
    """
    if not is_distributed():
        return x
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous()), dim=0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)
