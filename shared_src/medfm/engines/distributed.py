"""What each process of a distributed run attaches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from monai.handlers import CheckpointLoader, LrScheduleHandler, ValidationHandler

from .best_model import ServedModelSaver
from .checkpoint import ResumeFromCheckpoint
from .sampler_epoch import SamplerEpochHandler

__all__ = ["EVERY_RANK_HANDLERS", "handlers_for_rank"]

# Handlers that change the training state (or what each process samples): every process must run them. Everything else (progress bar,
# TensorBoard, checkpoint saving) writes output and runs on rank 0 only. CheckpointLoader loads weights when the trainer starts, after
# DistributedDataParallel has synchronised the ranks (MONAI Label's /train inserts one), so every rank must load them itself.
# Validation runs on every rank too (ignite's metrics all-reduce over the ranks, so an evaluation on rank 0 alone would
# wait forever): ValidationHandler, and ServedModelSaver, which validates and writes on rank 0 alone.
EVERY_RANK_HANDLERS: tuple[type, ...] = (
    ResumeFromCheckpoint,
    LrScheduleHandler,
    SamplerEpochHandler,
    CheckpointLoader,
    ValidationHandler,
    ServedModelSaver,
)


def handlers_for_rank(handlers: Sequence[Any], rank: int | None = None) -> list[Any]:
    """All ``handlers`` on rank 0; on other ranks only the state-changing ones (:data:`EVERY_RANK_HANDLERS`).

    Args:
        handlers: a bundle's ``train#handlers``.
        rank: process rank; defaults to the initialised process group's rank (0 without one).
    """
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        return list(handlers)
    return [h for h in handlers if isinstance(h, EVERY_RANK_HANDLERS)]
