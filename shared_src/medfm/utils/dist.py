"""Distributed helpers in one place: the process group's state (rank, world size), unwrapping a
``DistributedDataParallel`` network, rank-seeded random generators, and cross-rank gathers that keep or drop
gradients. Outside a process group every helper behaves as rank 0 of 1."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .seeding import derive_seed

__all__ = ["all_gather_cat", "get_rank", "get_world_size", "in_process_group", "is_distributed", "rank_generator",
           "unwrap"]  # fmt: skip


def in_process_group() -> bool:
    """True inside an initialised default process group (of any size)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """This process's rank in the default process group; 0 outside one."""
    return dist.get_rank() if in_process_group() else 0


def get_world_size() -> int:
    """Ranks in the default process group; 1 outside one."""
    return dist.get_world_size() if in_process_group() else 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return get_world_size() > 1


def unwrap(module: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` (or any wrapper that keeps it as ``.module``); ``module``
    itself otherwise."""
    inner = getattr(module, "module", None)
    return inner if isinstance(inner, nn.Module) else module


def rank_generator(seed: int, device: torch.device | str = "cpu", step: int | None = None) -> torch.Generator:
    """A generator on ``device`` for this rank: seeded ``seed + rank``, or ``derive_seed(seed, rank, step)`` when
    ``step`` is given (so a resumed run draws what the uninterrupted one drew at that step)."""
    rank = get_rank()
    return torch.Generator(device=device).manual_seed(seed + rank if step is None else derive_seed(seed, rank, step))


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
