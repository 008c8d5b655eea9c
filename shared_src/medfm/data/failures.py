"""Per-item load failures: named errors for training, recorded-and-skipped items for batch inference.

A transform chain that fails on one datalist item raises from deep inside a library (``EOFError`` from a truncated
``.nii.gz``, an ``ITK ERROR`` from a damaged DICOM) and MONAI's ``Dataset`` wraps it in a ``RuntimeError`` that names
the transform, not the file. :class:`FileErrorDataset` names the item's files and the problem in every error:

- ``skip_failed=False`` (training, evaluation): it raises ``ValueError("<files>: <problem>")`` from the original
  error, so a run stops at the first bad file and says which one;
- ``skip_failed=True`` (batch inference): it returns a marker ``{FAILED_KEY: {"file", "reason"}}`` instead;
  :func:`collate_skip_failed` keeps the markers beside the good items of a batch, and
  :class:`medfm.engines.SkipFailedIteration` records them, runs the model on the rest and records a batch the
  model or the postprocessing fails on; :class:`medfm.engines.FailedItemsWriter` writes ``failed.csv`` and makes
  the run fail once every other prediction is written.

A datalist item that already carries ``LOAD_ERROR_KEY`` (a header a datalist builder could not read, see
``unreadable="record"`` of :func:`medfm.data.build_spad_datalist`) fails the same way without being loaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monai.data import Dataset, list_data_collate

__all__ = [
    "FAILED_KEY",
    "LOAD_ERROR_KEY",
    "SOURCE_KEY",
    "FileErrorDataset",
    "collate_skip_failed",
    "error_reason",
    "item_source",
]

FAILED_KEY = "_failed"
"""Key of the marker a skipped item becomes (and of a batch's list of failures)."""
LOAD_ERROR_KEY = "load_error"
"""Datalist key of the reason an item's header could not be read."""
SOURCE_KEY = "_source"
"""Key :class:`FileErrorDataset` adds to every loaded item with its files (a batch's failure names them)."""
_ID_KEYS = ("case", "subject", "id", "name")
_WRAPPER_PREFIX = "applying transform"

logger = logging.getLogger(__name__)


def item_source(item: Any) -> str:
    """The files of a datalist item, for messages: its string values that are paths (``"; "``-joined, the case or
    subject id first when there is one), else its id, else its ``repr`` (cut to 200 characters)."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    if not isinstance(item, Mapping):
        return repr(item)[:200]
    ids = [f"{k} {item[k]}" for k in _ID_KEYS if isinstance(item.get(k), (str, int)) and item.get(k) != ""]
    files = []
    for k, v in item.items():
        if isinstance(v, (str, os.PathLike)) and k not in _ID_KEYS and k != LOAD_ERROR_KEY:
            v = os.fspath(v)
            if os.sep in v or os.path.exists(v):
                files.append(v)
    if files:
        return "; ".join(ids[:1] + files)
    return ids[0] if ids else repr(dict(item))[:200]


def error_reason(exc: BaseException) -> str:
    """One line saying what went wrong: ``"<Type>: <message>"`` of the outermost exception in ``exc``'s chain that
    is not MONAI's ``"applying transform ..."`` wrapper (newlines folded, a traceback quoted in the message left out,
    cut to 1,000 characters)."""
    seen, e = set(), exc
    chain = []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    pick = next((c for c in chain if not str(c).strip().startswith(_WRAPPER_PREFIX)), chain[-1])
    msg = " ".join(str(pick).split("Traceback (most recent call last)")[0].split())
    return f"{type(pick).__name__}: {msg}"[:1000] if msg else type(pick).__name__


class FileErrorDataset(Dataset):
    """MONAI ``Dataset`` whose per-item errors name the item's files and the problem (module doc).

    Args:
        data: the datalist.
        transform: the preprocessing applied to each item.
        skip_failed: return a failure marker instead of raising (batch inference).
    """

    def __init__(self, data: Sequence, transform: Callable | None = None, skip_failed: bool = False) -> None:
        super().__init__(data, transform)
        self.skip_failed = bool(skip_failed)

    def _fail(self, index: int, reason: str, cause: BaseException | None) -> dict[str, Any]:
        source = item_source(self.data[index])
        if not self.skip_failed:
            raise ValueError(f"{source}: {reason}") from cause
        logger.warning("skipping %s: %s", source, reason)
        return {FAILED_KEY: {"file": source, "reason": reason}}

    def _transform(self, index: int) -> Any:
        item = self.data[index]
        if isinstance(item, Mapping) and item.get(LOAD_ERROR_KEY):
            return self._fail(index, str(item[LOAD_ERROR_KEY]), None)
        try:
            out = super()._transform(index)
        except Exception as e:  # any failure of one item's loading or preprocessing
            return self._fail(index, error_reason(e), e)
        if isinstance(out, dict):
            out.setdefault(SOURCE_KEY, item_source(item))
        return out


def is_failed(item: Any) -> bool:
    """Whether ``item`` is the marker of a skipped item."""
    return isinstance(item, Mapping) and FAILED_KEY in item and len(item) == 1


def collate_skip_failed(batch: Sequence[Any]) -> Any:
    """``list_data_collate`` of the good items of ``batch``, with the failure markers' ``{"file", "reason"}`` under
    ``FAILED_KEY`` (a list; absent when none failed). A batch whose items all failed is ``{FAILED_KEY: [...]}``."""
    failed = [b[FAILED_KEY] for b in batch if is_failed(b)]
    good = [b for b in batch if not is_failed(b)]
    if not failed:
        return list_data_collate(good)
    if not good:
        return {FAILED_KEY: failed}
    out = list_data_collate(good)
    if not isinstance(out, dict):
        raise TypeError(f"collate_skip_failed needs dict items, got {type(out).__name__}.")
    out[FAILED_KEY] = failed
    return out
