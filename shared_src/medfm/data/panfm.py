"""Pan-FM subject tables (one row per subject, one image per organ) and the synthetic pan-organ demo.

Pan-FM (Wu et al., `arXiv:2605.07055 <https://arxiv.org/abs/2605.07055>`_) pre-trains one backbone on MRI of
seven organs (:data:`ORGANS`) whose availability is missing not at random. A subject table, read by
:func:`read_subject_table`, is a CSV or a JSON list of objects::

    subject,brain,heart,adipose,liver,kidney,spleen,pancreas,metabolic,cardiac
    sub_000,organs/sub_000_brain.nii.gz,organs/sub_000_heart.nii.gz,,...,1,0

with one image path per organ (relative to the table's folder or ``base_dir``, or absolute; empty when the
organ is missing) and optional 0/1 label columns.

The synthetic demo in this layout: :mod:`medfm.data.synthetic_panfm`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from medfm.organs import PANFM_ORGANS

from .group_sampler import GroupBatchSampler, length_buckets

__all__ = [
    "ORGANS",
    "PANFM_TABLE",
    "label_names_from_table",
    "read_subject_table",
    "subject_token_counts",
    "token_bucket_sampler",
]

ORGANS = PANFM_ORGANS  # the one organ tuple (medfm.organs), under the name the data layer has always used
PANFM_TABLE = "subjects.csv"
"""File name of the subject table inside a Pan-FM dataset directory."""


# ----------------------------------------------------------------------------------------------- tables
def _table_path(path: str) -> str:
    """The table file: ``path`` itself, or ``<path>/subjects.csv`` for a directory."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        path = os.path.join(path, PANFM_TABLE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"subject table {path} does not exist.")
    return path


def _read_rows(path: str) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """Columns (in order) and ``(where, row)`` pairs of a CSV or JSON table; ``where`` names the line/entry."""
    if path.lower().endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e}).") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: a JSON subject table must be a list of objects (one per subject).")
        columns = list(dict.fromkeys(k for r in rows for k in r))
        return columns, [(f"entry {n}", r) for n, r in enumerate(rows)]
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or ()]
        reader.fieldnames = columns
        rows = [(f"line {n}", r) for n, r in enumerate(reader, start=2)]
    return columns, rows


def _text(value: Any) -> str:
    """A cell as stripped text; ``None`` (JSON null, short CSV row) is empty."""
    return "" if value is None else str(value).strip()


def label_names_from_table(path: str, organs: Sequence[str] = ORGANS) -> list[str]:
    """The columns of a subject table that are neither ``subject`` nor an organ, in table order.

    Args:
        path: CSV or JSON table, or a dataset directory holding ``subjects.csv``.
        organs: organ column names.
    """
    columns, _ = _read_rows(_table_path(path))
    return [c for c in columns if c != "subject" and c not in organs]


def read_subject_table(
    path: str,
    organs: Sequence[str] = ORGANS,
    label_names: Sequence[str] | None = None,
    base_dir: str | None = None,
    num_labels: int | None = None,
) -> list[dict[str, Any]]:
    """Read a Pan-FM subject table (layout: module doc) into a datalist, checking every file.

    Args:
        path: ``.csv`` or ``.json`` table, or a dataset directory holding ``subjects.csv``.
        organs: organ columns, in the order of ``present``; a CSV must have every one (empty cells for
            missing organs), a JSON object may leave a missing organ out.
        label_names: label columns to read (values 0 or 1, none missing); ``None`` reads no label. Other
            columns are ignored.
        base_dir: folder that relative paths start from; default the table's folder.
        num_labels: the network's label count (a config value); with ``label_names`` their number must match.

    Returns:
        One item per subject, in table order: ``{"subject": id, <organ>: absolute path or None, ...,
        "present": [bool] * len(organs), "labels": [float] * len(label_names)}`` (``labels`` only with
        ``label_names``).

    Raises:
        FileNotFoundError: the table does not exist.
        ValueError: naming the table and the subject: empty table, missing column, empty or duplicate subject
            id, a row with no organ, an image file that does not exist, a missing or non-0/1 label; naming the
            table: ``label_names`` of another length than ``num_labels``.
    """
    table = _table_path(path)
    organs = tuple(organs)
    labels = None if label_names is None else tuple(label_names)
    if not organs or len(set(organs)) != len(organs):
        raise ValueError(f"organs must be distinct names, got {organs}.")
    if labels is not None and num_labels is not None and len(labels) != num_labels:
        raise ValueError(
            f"{table}: {len(labels)} label columns {list(labels)} but the network has num_labels={num_labels}; "
            f"set num_labels to {len(labels)} (or choose label_names) so that the two agree."
        )
    if labels is not None and set(labels) & ({"subject"} | set(organs)):
        raise ValueError(f"label_names {labels} must not repeat 'subject' or an organ of {organs}.")
    columns, rows = _read_rows(table)
    if not rows:
        raise ValueError(f"{table}: empty subject table (no subject rows).")
    is_csv = not table.lower().endswith(".json")
    required = ["subject"] + (list(organs) if is_csv else []) + list(labels or ())
    absent = [c for c in required if c not in columns]
    if absent:
        raise ValueError(f"{table}: no column {absent} (columns: {columns}).")
    root = os.path.abspath(base_dir) if base_dir is not None else os.path.dirname(table)
    items: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        sid = _text(row.get("subject"))
        if not sid:
            raise ValueError(f"{table}, {where}: empty subject id.")
        if sid in seen:
            raise ValueError(f"{table}, {where}: subject {sid!r} is listed twice (first at {seen[sid]}).")
        seen[sid] = where
        item: dict[str, Any] = {"subject": sid}
        for organ in organs:
            value = row.get(organ)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{table}: subject {sid!r}, {organ}: expected a path, got {value!r}.")
            rel = _text(value)
            if not rel:
                item[organ] = None
                continue
            full = os.path.normpath(os.path.join(root, os.path.expanduser(rel)))
            if not os.path.isfile(full):
                raise ValueError(f"{table}: subject {sid!r}, {organ} image {full} does not exist.")
            item[organ] = full
        item["present"] = [item[o] is not None for o in organs]
        if not any(item["present"]):
            raise ValueError(f"{table}: subject {sid!r} ({where}) names no organ image (columns {list(organs)}).")
        if labels is not None:
            item["labels"] = [_label(row.get(name), table, sid, name) for name in labels]
        items.append(item)
    return items


def _label(value: Any, table: str, sid: str, name: str) -> float:
    """One 0/1 label cell as a float."""
    text = _text(value)
    if not text:
        raise ValueError(f"{table}: subject {sid!r} has no value for label {name!r}.")
    try:
        x = float(value) if isinstance(value, (bool, int, float)) else float(text)
    except ValueError:
        x = math.nan
    if x not in (0.0, 1.0):
        raise ValueError(f"{table}: subject {sid!r}, label {name!r} must be 0 or 1, got {value!r}.")
    return x


# ----------------------------------------------------------------------------------------------- batching


def subject_token_counts(
    datalist: Sequence[Mapping[str, Any]], num_tokens: Mapping[str, int], organs: Sequence[str] = ORGANS
) -> list[int]:
    """Tokens of every subject: the sum of ``num_tokens[o]`` over its present organs (organs the network does not
    have count 0).

    Args:
        datalist: items of :func:`read_subject_table` (``present``: one bool per organ of ``organs``).
        num_tokens: organ -> tokens of its grid (``PanFMEncoder.num_tokens``).
        organs: the column order of ``present``.
    """
    counts = []
    for i, item in enumerate(datalist):
        present = item.get("present") if isinstance(item, Mapping) else None
        if present is None or len(present) != len(organs):
            name = item.get("subject", "?") if isinstance(item, Mapping) else repr(item)
            raise ValueError(
                f"datalist item {i} ({name}) needs 'present' with one flag per organ of {list(organs)}; build it "
                "with read_subject_table."
            )
        counts.append(sum(int(num_tokens.get(o, 0)) for o, p in zip(organs, present) if p))
    return counts


def token_bucket_sampler(
    datalist: Sequence[Mapping[str, Any]],
    num_tokens: Mapping[str, int],
    batch_size: int,
    num_buckets: int = 8,
    organs: Sequence[str] = ORGANS,
    **kw: Any,
) -> GroupBatchSampler:
    """Batches of subjects with similar token counts (a ``batch_sampler`` for ``DataLoader``).

    A batch is padded to its longest subject, so a batch mixing a seven-organ subject with one-organ subjects costs
    as much as seven-organ ones. Subjects are put in ``num_buckets`` equal-frequency buckets of token count
    (:func:`~medfm.data.length_buckets`) and each batch is drawn within one bucket
    (:class:`~medfm.data.GroupBatchSampler`: shuffled per ``seed + epoch``, sharded over ranks, with
    ``align_replicas`` on by default so that all ranks draw from the same bucket at a step), so the cost of a step
    follows its subjects' tokens. ``num_buckets=1`` is plain shuffling.

    Args:
        datalist: items of :func:`read_subject_table`.
        num_tokens: organ -> tokens of its grid (``PanFMEncoder.num_tokens``).
        batch_size: subjects per batch (per rank).
        num_buckets: token-count buckets.
        organs: the column order of ``present``.
        **kw: ``shuffle``, ``drop_last``, ``seed``, ``num_replicas``, ``rank``, ``align_replicas`` (default True) of
            :class:`~medfm.data.GroupBatchSampler`.
    """
    counts = subject_token_counts(datalist, num_tokens, organs)
    kw.setdefault("align_replicas", True)
    return GroupBatchSampler(length_buckets(counts, num_buckets, batch_size), batch_size, **kw)
