"""Tell a batch sampler the epoch, so that it reshuffles (MONAI's workflows do this for DistributedSampler only),
and where in the epoch a resumed run starts."""

from __future__ import annotations

from typing import Any

from ignite.engine import Engine, Events

__all__ = ["SamplerEpochHandler"]


class SamplerEpochHandler:
    """Call ``sampler.set_epoch(epoch)`` when each epoch starts (e.g. :class:`medfm.data.AnisoBatchSampler`), and
    ``sampler.set_start(k)`` when a run resumed from a checkpoint written ``k`` iterations into the epoch.

    ignite resumes such a run counting from iteration ``k`` of the epoch but restarts the data iterator at the
    epoch's first batch; skipping the ``k`` batches already trained on keeps the resumed run on the batches of the
    uninterrupted one. ``engine.state.epoch_length`` must equal the sampler's batches per epoch (a ValueError otherwise:
    ignite would silently cut or repeat epochs).

    Args:
        sampler: any object with ``set_epoch(int)`` (and ``set_start(int)`` for mid-epoch resumption); a DataLoader
            is accepted and its ``batch_sampler`` used.
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
        length = engine.state.epoch_length
        if length is not None and length != len(self.sampler):
            raise ValueError(
                f"the engine's epoch_length ({length}, from the checkpoint when resuming) differs from the sampler's "
                f"{len(self.sampler)} batches per epoch: the dataset, batch size or number of processes changed since "
                "the checkpoint was written, so the run cannot continue the same epochs."
            )
        start = int(engine.state.iteration) - (int(engine.state.epoch) - 1) * int(length or 0)
        if start <= 0:
            return
        if not callable(getattr(self.sampler, "set_start", None)):
            raise ValueError(
                f"cannot resume in the middle of epoch {engine.state.epoch}: {type(self.sampler).__name__} has no "
                "set_start(batches) to skip the batches already trained on."
            )
        self.sampler.set_start(start)
