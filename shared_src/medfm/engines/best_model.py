"""Keep the best model by a validation metric, written atomically."""

from __future__ import annotations

import logging
import os

import torch.nn as nn
from ignite.engine import Engine, Events

from .checkpoint import atomic_torch_save

__all__ = ["BestModelSaver"]

logger = logging.getLogger(__name__)


class BestModelSaver:
    """Attach to an evaluator: after each evaluation whose ``metric_name`` beats the best so far, write
    ``model``'s weights to ``<save_dir>/<filename>`` (temporary file + rename).

    Args:
        save_dir: folder of the file.
        model: the network (a DistributedDataParallel wrapper is unwrapped).
        metric_name: key of ``engine.state.metrics``.
        filename: file name (``model.pt`` is what MONAI's tools and MONAI Label load).
        higher_is_better: direction of the metric.
    """

    def __init__(
        self, save_dir: str, model: nn.Module, metric_name: str, filename: str = "model.pt", higher_is_better: bool = True
    ) -> None:
        self.save_dir = save_dir
        self.model = model
        self.metric_name = metric_name
        self.filename = filename
        self.sign = 1.0 if higher_is_better else -1.0
        self.best: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.metric_name not in engine.state.metrics:
            raise KeyError(f"metric {self.metric_name!r} not computed; available: {sorted(engine.state.metrics)}.")
        value = float(engine.state.metrics[self.metric_name])
        if self.best is None or self.sign * value > self.sign * self.best:
            self.best = value
            model = getattr(self.model, "module", self.model)
            path = os.path.join(self.save_dir, self.filename)
            atomic_torch_save(model.state_dict(), path)
            logger.info("new best %s = %.4f: saved %s", self.metric_name, value, path)
