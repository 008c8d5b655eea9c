"""Per-iteration seeding: the random draws of iteration ``i`` depend only on ``(seed, rank, i)``."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from medfm.utils.dist import get_rank
from medfm.utils.seeding import derive_seed

__all__ = ["StepSeedHandler"]


class StepSeedHandler:
    """When each iteration starts, seed the global generators (torch on every device, NumPy, Python) from
    ``(seed, rank, iteration)`` and call ``set_step(iteration)`` on each of ``targets`` (objects with their own
    generators, e.g. :class:`medfm.engines.FratMAEPretrainPrepareBatch`, which then reseed them the same way).

    Dropout, drop-path, gate noise and mask draws of an iteration then do not depend on what ran before it, so a
    run resumed from a checkpoint draws what the uninterrupted run drew. The batch of the iteration has been
    loaded already (ignite fetches it before ``ITERATION_STARTED``); the data pipeline is seeded per sample
    (:class:`medfm.data.SeededDataset`).

    Args:
        seed: the run's seed.
        targets: objects with ``set_step(step: int)``.
    """

    def __init__(self, seed: int, targets: Sequence[Any] = ()) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        for t in targets:
            if not callable(getattr(t, "set_step", None)):
                raise TypeError(f"{type(t).__name__} has no set_step(step) method to reseed its generators.")
        self.seed = seed
        self.targets = list(targets)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        step = int(engine.state.iteration)
        s = derive_seed(self.seed, get_rank(), step)
        torch.manual_seed(s)  # also every CUDA device
        np.random.seed(s % 2**32)
        random.seed(s)
        for t in self.targets:
            t.set_step(step)
