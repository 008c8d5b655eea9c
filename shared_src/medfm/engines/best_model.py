"""Keep the best model by a validation metric, written atomically; keep a served bundle's model current."""

from __future__ import annotations

import logging
import math
import os

import torch.nn as nn
from ignite.engine import Engine, Events

from medfm.utils.dist import get_rank, unwrap

from .checkpoint import atomic_torch_save

__all__ = ["BestModelSaver", "ServedModelSaver"]

logger = logging.getLogger(__name__)


class BestModelSaver:
    """Attach to an evaluator: after each evaluation whose ``metric_name`` beats the best so far, write
    ``model``'s weights to ``<save_dir>/<filename>`` (temporary file + rename).

    The best score so far is its state (:meth:`state_dict`): put the saver in the training checkpoint's
    ``save_dict`` so a resumed run keeps the best model of the whole run, not the first one after the restart.

    Args:
        save_dir: folder of the file.
        model: the network (a DistributedDataParallel wrapper is unwrapped).
        metric_name: key of ``engine.state.metrics``.
        filename: file name (``model.pt`` is what MONAI's tools and MONAI Label load).
        higher_is_better: direction of the metric.
    """

    def __init__(
        self,
        save_dir: str,
        model: nn.Module,
        metric_name: str,
        filename: str = "model.pt",
        higher_is_better: bool = True,
    ) -> None:
        self.save_dir = save_dir
        self.model = model
        self.metric_name = metric_name
        self.filename = filename
        self.sign = 1.0 if higher_is_better else -1.0
        self.best: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def state_dict(self) -> dict[str, float | None]:
        """``{"best": best score so far, or None}``."""
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        """Restore the best score of :meth:`state_dict`."""
        if "best" not in state:
            raise ValueError(f"a BestModelSaver state needs a 'best' entry, got keys {sorted(state)}.")
        self.best = None if state["best"] is None else float(state["best"])

    def __call__(self, engine: Engine) -> None:
        if self.metric_name not in engine.state.metrics:
            raise KeyError(f"metric {self.metric_name!r} not computed; available: {sorted(engine.state.metrics)}.")
        value = float(engine.state.metrics[self.metric_name])
        if math.isnan(value):  # undefined (e.g. Dice without a positive case): no score, nothing written
            logger.warning("%s is undefined (NaN) this evaluation; the saved model is kept", self.metric_name)
            return
        if self.best is None or self.sign * value > self.sign * self.best:
            self.best = value
            model = unwrap(self.model)
            path = os.path.join(self.save_dir, self.filename)
            atomic_torch_save(model.state_dict(), path)
            logger.info("new best %s = %.4f: saved %s", self.metric_name, value, path)


class ServedModelSaver:
    """Keep a served bundle's ``models/model.pt`` current when it is re-trained (MONAI Label's ``/train``).

    Attached to the trainer in place of ``ValidationHandler``: every ``interval`` epochs it runs
    ``evaluator`` if the evaluator's data loader holds data, and writes the weights when ``metric_name``
    improves (:class:`BestModelSaver`). The served weights only get better: before the first training step
    (after every STARTED handler, so after MONAI Label's checkpoint loader has loaded the served weights) the
    evaluator runs once and its metric seeds the best score, so a re-training that never beats the weights
    being served leaves ``models/model.pt`` as it was. An undefined score (NaN, e.g. Dice on validation cases without
a lesion) counts as no validation. When training completes and no validation gave a score (MONAI Label's
    default 20% validation split leaves none with one or two labels), it writes the final weights, so the
    file always reflects the latest training. MONAI Label's ``/infer`` reloads the file when it changes.

    In a distributed run every rank must attach it (ignite's metrics all-reduce over the ranks, so an
    evaluation on rank 0 alone would wait forever): each rank evaluates the whole validation set with the
    same weights, which leaves the metric unchanged, and rank 0 alone writes.

    Args:
        evaluator: validation engine (``SupervisedEvaluator``) with a ``data_loader``.
        model: the network (a DistributedDataParallel wrapper is unwrapped).
        save_dir: folder of the file (the served bundle's ``models``).
        metric_name: key of the evaluator's ``state.metrics``.
        filename: file name.
        interval: epochs between validations.
        higher_is_better: direction of the metric.
    """

    def __init__(
        self,
        evaluator: Engine,
        model: nn.Module,
        save_dir: str,
        metric_name: str,
        filename: str = "model.pt",
        interval: int = 1,
        higher_is_better: bool = True,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be positive, got {interval}.")
        self.evaluator = evaluator
        self.best = BestModelSaver(save_dir, model, metric_name, filename, higher_is_better)
        self.interval = interval
        self.validated = False
        self.baseline: float | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED(once=engine.state.iteration + 1), self.validate_start)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self.validate)
        engine.add_event_handler(Events.COMPLETED, self.save_final_if_unvalidated)

    @staticmethod
    def _writes() -> bool:
        return get_rank() == 0

    def _has_data(self) -> bool:
        loader = getattr(self.evaluator, "data_loader", None)
        return loader is not None and len(loader) > 0

    def validate_start(self, engine: Engine) -> None:
        """Score the weights training starts from (the served ones) and make that the score to beat."""
        if not self._has_data():
            return
        self.evaluator.run()
        self.baseline = float(self.evaluator.state.metrics[self.best.metric_name])
        logger.info("served weights before training: %s = %.4f", self.best.metric_name, self.baseline)
        if not math.isnan(self.baseline):
            self.best.best = self.baseline

    def validate(self, engine: Engine) -> None:
        if not self._has_data():
            return
        self.evaluator.run(engine.state.epoch)
        self.validated |= not math.isnan(float(self.evaluator.state.metrics[self.best.metric_name]))
        if self._writes():
            self.best(self.evaluator)

    def save_final_if_unvalidated(self, engine: Engine) -> None:
        if self.validated or not self._writes():
            return
        model = unwrap(self.best.model)
        path = os.path.join(self.best.save_dir, self.best.filename)
        atomic_torch_save(model.state_dict(), path)
        logger.info("no validation data: saved the final weights to %s", path)
