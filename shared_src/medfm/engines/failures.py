"""Batch inference that survives bad files: skip, record, write ``failed.csv``, fail the run at the end.

Wiring (each bundle's ``inference.json``): ``medfm.data.FileErrorDataset(skip_failed=True)`` turns an item that
cannot be loaded into a marker, ``medfm.data.collate_skip_failed`` the loader's ``collate_fn``,
:class:`SkipFailedIteration` the evaluator's ``iteration_update`` and :class:`FailedItemsWriter` its last handler.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from typing import Any

from ignite.engine import Engine, Events

from medfm.data.failures import FAILED_KEY, SOURCE_KEY, error_reason

__all__ = ["FailedItemsError", "FailedItemsWriter", "SkipFailedIteration", "failed_items"]

STATE_KEY = "failed_items"
"""Attribute of ``engine.state``: the ``{"file", "reason"}`` of every item that failed so far."""

logger = logging.getLogger(__name__)


class FailedItemsError(RuntimeError):
    """Raised at the end of a batch-inference run in which some inputs could not be processed."""


def failed_items(engine: Engine) -> list[dict[str, str]]:
    """The list of failures recorded on ``engine.state`` (created empty when absent)."""
    items = getattr(engine.state, STATE_KEY, None)
    if items is None:
        items = []
        setattr(engine.state, STATE_KEY, items)
    return items


def _record(engine: Engine, file: str, reason: str) -> None:
    failed_items(engine).append({"file": file, "reason": reason})
    logger.warning("could not process %s: %s", file, reason)


class SkipFailedIteration:
    """``iteration_update`` of a ``SupervisedEvaluator`` for batch inference: the batch's failure markers (from
    :func:`medfm.data.collate_skip_failed`) are recorded on ``engine.state.failed_items`` and left out; the
    evaluator's own iteration runs on the rest. An error there (a shape the model cannot take, a prediction that
    cannot be written) is recorded for every file of the batch instead of stopping the run. A batch with nothing
    left gives the output ``None`` (``ITERATION_COMPLETED`` handlers skip it).
    """

    def __call__(self, engine: Engine, batchdata: Any) -> Any:
        if isinstance(batchdata, Mapping) and FAILED_KEY in batchdata:
            batchdata = dict(batchdata)
            for f in batchdata.pop(FAILED_KEY):
                _record(engine, str(f["file"]), str(f["reason"]))
            if not batchdata:
                engine.state.batch = None
                return None
        engine.state.batch = batchdata
        try:
            return engine._iteration(engine, batchdata)
        except Exception as e:
            sources = batchdata.get(SOURCE_KEY) if isinstance(batchdata, Mapping) else None
            sources = [sources] if isinstance(sources, str) else list(sources or ["<batch without file names>"])
            reason = error_reason(e)
            for s in sources:
                _record(engine, str(s), reason)
            engine.state.batch = None
            return None


class FailedItemsWriter:
    """Write ``<output_dir>/<filename>`` (columns ``file, reason``; only the header when nothing failed) when the
    run completes, and then raise :class:`FailedItemsError` if any item failed, so that the command exits non-zero
    after every other prediction is written. Attach it last, after the handlers that write results.

    Args:
        output_dir: folder of the CSV (created if needed).
        filename: CSV name.
        raise_on_failure: raise when any item failed (``False``: only log and write the list).
    """

    def __init__(self, output_dir: str, filename: str = "failed.csv", raise_on_failure: bool = True) -> None:
        self.output_dir, self.filename, self.raise_on_failure = output_dir, filename, bool(raise_on_failure)

    @property
    def path(self) -> str:
        return os.path.join(self.output_dir, self.filename)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda e: setattr(e.state, STATE_KEY, []))
        engine.add_event_handler(Events.COMPLETED, self.write)

    def write(self, engine: Engine) -> None:
        items = failed_items(engine)
        os.makedirs(self.output_dir, exist_ok=True)
        with open(self.path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["file", "reason"])
            w.writeheader()
            w.writerows(items)
        if not items:
            return
        loader = getattr(engine, "data_loader", None)
        total = len(loader.dataset) if loader is not None and hasattr(loader.dataset, "__len__") else None
        of = f" of {total}" if total is not None else ""
        msg = (f"{len(items)}{of} inputs could not be processed (listed with the reason in {self.path}); "
               "the predictions of the others are written.")  # fmt: skip
        logger.error(msg)
        if self.raise_on_failure:
            raise FailedItemsError(msg)
