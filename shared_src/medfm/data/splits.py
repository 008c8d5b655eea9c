"""Fine-tuning splits: a validation hold-out and a seeded, recorded label fraction (20% / 40% / 100%)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from typing import Any

from ..utils.files import atomic_path
from .autopet import split_datalist

__all__ = ["finetune_splits", "label_fraction_subset", "with_class_label"]


def label_fraction_subset(datalist: Sequence[dict[str, Any]], fraction: float, seed: int) -> list[dict[str, Any]]:
    """``round(len * fraction)`` items (at least one) drawn without replacement with ``seed``, input order kept.

    FratMAE's limited-label protocol fine-tunes on 20% (and 40%, 100%) of the training set.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}.")
    if not datalist:
        raise ValueError("cannot take a label fraction of an empty datalist.")
    n = max(1, int(round(len(datalist) * fraction)))
    picked = set(random.Random(seed).sample(range(len(datalist)), n))
    return [dict(d) for i, d in enumerate(datalist) if i in picked]


def finetune_splits(
    datalist: Sequence[dict[str, Any]],
    val_fraction: float,
    label_fraction: float,
    seed: int,
    record_file: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Hold out ``val_fraction`` for validation, then keep ``label_fraction`` of the rest for training.

    The validation set does not depend on the label fraction, so 20%, 40% and 100% runs validate on the same
    cases. With ``record_file`` the split (case ids, fractions, seed) is written there as JSON, so a run
    states exactly which cases it trained on.

    Returns:
        ``{"train": [...], "val": [...]}``.
    """
    train, val = split_datalist(datalist, val_fraction, seed)
    train = label_fraction_subset(train, label_fraction, seed)
    if record_file:
        os.makedirs(os.path.dirname(os.path.abspath(record_file)), exist_ok=True)
        record = {
            "seed": seed, "val_fraction": val_fraction, "label_fraction": label_fraction,
            "train": [d.get("case", d.get("subject", d.get("image"))) for d in train],
            "val": [d.get("case", d.get("subject", d.get("image"))) for d in val],
        }  # fmt: skip
        # every rank of a multi-GPU run writes the same record
        with atomic_path(record_file) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
    return {"train": train, "val": val}


def with_class_label(datalist: Sequence[dict[str, Any]], key: str = "stage") -> list[dict[str, Any]]:
    """Items for a classification task: ``label`` becomes the integer of metadata column ``key`` (the lesion
    mask path, if any, is dropped) and metadata columns not needed downstream are removed.

    Raises:
        ValueError: a case has no value for ``key`` (named, with the column).
    """
    out = []
    for d in datalist:
        value = d.get(key)
        if value is None:
            raise ValueError(
                f"case {d.get('case', '?')!r} has no {key!r} value; add a {key!r} column to the metadata table."
            )
        try:
            label = int(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f"case {d.get('case', '?')!r}: {key!r} must be an integer class, got {value!r}.") from e
        out.append({"case": d["case"], "ct": d["ct"], "pet": d["pet"], "prompt": d.get("prompt", ""), "label": label})
    return out
