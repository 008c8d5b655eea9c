"""Tell a batch sampler the epoch, so that it reshuffles (MONAI's workflows do this for DistributedSampler only)."""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events

__all__ = ["SamplerEpochHandler"]


class SamplerEpochHandler:
    """Call ``sampler.set_epoch(epoch)`` when each epoch starts (e.g. :class:`medfm.data.AnisoBatchSampler`).

    Args:
        sampler: any object with ``set_epoch(int)``; a DataLoader is accepted and its ``batch_sampler`` used.
    """

    def __init__(self, sampler: Any) -> None:
        target = getattr(sampler, "batch_sampler", None) if hasattr(sampler, "dataset") else sampler
        if not callable(getattr(target, "set_epoch", None)):
            raise TypeError(f"{type(target).__name__} has no set_epoch(epoch) method.")
        self.sampler = target

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.sampler.set_epoch(engine.state.epoch)
