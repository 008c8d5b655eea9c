"""The handlers every medfm trainer starts with, as one: resume, per-step seeding, sampler epoch, LR schedule."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ignite.engine import Engine
from monai.handlers import LrScheduleHandler

from .checkpoint import ResumeFromCheckpoint
from .sampler_epoch import SamplerEpochHandler
from .step_seed import StepSeedHandler

__all__ = ["RunState"]


class RunState:
    """Attach, in this order, the handlers that keep a training run's state where the uninterrupted run has it:

    1. :class:`ResumeFromCheckpoint` (``ckpt_dir``, ``load_dict``, ``map_location``; only when ``resume``);
    2. :class:`StepSeedHandler` (``seed``, ``seed_targets``): each iteration's random draws depend on its number;
    3. :class:`SamplerEpochHandler` (``sampler``): each epoch's batches depend on its number; a resumed epoch skips
       the batches already trained on;
    4. one MONAI ``LrScheduleHandler`` per scheduler in ``lr_scheduler``, stepped every iteration.

    A bundle's ``train#handlers`` lists this first and its output handlers (validation, progress, TensorBoard, the
    checkpoint saver) after it, so a change to how runs resume is made here once, not in every training config.

    Args:
        ckpt_dir: folder of the run's ``checkpoint_iter=<n>.pt`` files.
        load_dict: the objects the checkpoint saver writes (``{"model": …, "optimizer": …, …}``).
        sampler: the training batch sampler (or its DataLoader), with ``set_epoch`` and ``set_start``.
        lr_scheduler: a scheduler, or a sequence of them (e.g. a generator's and a discriminator's).
        seed: the run's seed.
        seed_targets: objects with ``set_step(step)`` and generators of their own (e.g. a mask-drawing prepare_batch).
        resume: False starts afresh even when ``ckpt_dir`` holds checkpoints.
        map_location: passed to ``torch.load`` when resuming.
    """

    def __init__(
        self,
        ckpt_dir: str,
        load_dict: Mapping[str, Any],
        sampler: Any,
        lr_scheduler: Any,
        seed: int,
        seed_targets: Sequence[Any] = (),
        resume: bool = True,
        map_location: Any = None,
    ) -> None:
        schedulers = list(lr_scheduler) if isinstance(lr_scheduler, (list, tuple)) else [lr_scheduler]
        if not schedulers:
            raise ValueError("lr_scheduler: give at least one learning-rate scheduler.")
        self.resume = ResumeFromCheckpoint(ckpt_dir, load_dict, map_location=map_location, enabled=resume)
        self.step_seed = StepSeedHandler(seed, seed_targets)
        self.sampler_epoch = SamplerEpochHandler(sampler)
        self.lr_schedules = [LrScheduleHandler(s, print_lr=False, epoch_level=False) for s in schedulers]

    @property
    def handlers(self) -> list[Any]:
        """The handlers in the order :meth:`attach` attaches them."""
        return [self.resume, self.step_seed, self.sampler_epoch, *self.lr_schedules]

    def attach(self, engine: Engine) -> None:
        for handler in self.handlers:
            handler.attach(engine)
