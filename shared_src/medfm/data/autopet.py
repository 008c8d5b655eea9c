"""Datalists for PET/CT data in the AutoPET III nnU-Net layout (FratMAE's pre-training data).

The layout (nnU-Net "raw" dataset, as distributed for AutoPET III)::

    <dataset_dir>/imagesTr/<case>_0000.nii.gz   CT in HU, resampled onto the PET grid
    <dataset_dir>/imagesTr/<case>_0001.nii.gz   PET in SUV
    <dataset_dir>/labelsTr/<case>.nii.gz        lesion mask (optional)
    <dataset_dir>/metadata.csv                  per-case metadata (optional)

Uncompressed ``.nii`` files are accepted as well. The synthetic demo generator
(:mod:`medfm.data.synthetic_petct`) writes exactly this layout, so the demo and real data share one path.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections.abc import Sequence
from typing import Any

from .prompt import build_prompt

__all__ = ["build_autopet_datalist", "split_datalist", "find_petct_images", "CT_CHANNEL", "PET_CHANNEL"]

CT_CHANNEL = "0000"
PET_CHANNEL = "0001"
_NIFTI_EXTS = (".nii.gz", ".nii")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ext>\.nii\.gz|\.nii)$")
_CASE_COLUMNS = ("case", "case_id")
_RESERVED_KEYS = ("case", "ct", "pet", "label", "prompt")
_EXPECTED_LAYOUT = "imagesTr/<case>_0000.nii[.gz] (CT) and imagesTr/<case>_0001.nii[.gz] (PET)"


def find_petct_images(dataset_dir: str, images_subdir: str = "imagesTr") -> tuple[dict[str, str], dict[str, str]]:
    """Scan ``<dataset_dir>/<images_subdir>`` (default ``imagesTr``) for CT (``_0000``) and PET (``_0001``) files.

    Files of other channels and hidden files are ignored. A missing ``imagesTr`` gives two empty dicts.

    Args:
        dataset_dir: root of an AutoPET-style dataset.

    Returns:
        ``(ct, pet)``: dicts mapping case id to the absolute path of that case's CT / PET file.

    Raises:
        ValueError: a case has one channel both as ``.nii`` and as ``.nii.gz``.
    """
    images_dir = os.path.join(os.path.abspath(dataset_dir), images_subdir)
    found: dict[str, dict[str, str]] = {CT_CHANNEL: {}, PET_CHANNEL: {}}
    if not os.path.isdir(images_dir):
        return found[CT_CHANNEL], found[PET_CHANNEL]
    for name in sorted(os.listdir(images_dir)):
        match = _CHANNEL_RE.match(name)
        if name.startswith(".") or match is None or match["channel"] not in found:
            continue
        channel, case = found[match["channel"]], match["case"]
        if case in channel:
            raise ValueError(
                f"Case '{case}' has two files for channel _{match['channel']} in {images_dir}: "
                f"{os.path.basename(channel[case])} and {name}; keep only one."
            )
        channel[case] = os.path.join(images_dir, name)
    return found[CT_CHANNEL], found[PET_CHANNEL]


def _coerce(value: Any) -> Any:
    """Empty strings become ``None``; strings that spell an int/float become numbers."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text == "":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _read_metadata(metadata_file: str) -> dict[str, dict[str, Any]]:
    """Read a metadata table (CSV, TSV or JSON list of objects) into ``{case_id: {column: value}}``."""
    lower = metadata_file.lower()
    if lower.endswith(".json"):
        with open(metadata_file, encoding="utf-8") as f:
            rows = json.load(f)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"Metadata file {metadata_file} must hold a JSON list of objects (one per case).")
    elif lower.endswith((".csv", ".tsv", ".tab", ".txt")):
        delimiter = "," if lower.endswith(".csv") else "\t"
        with open(metadata_file, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = [str(c).strip() for c in reader.fieldnames or []]
            rows = list(reader)
        if not any(c in columns for c in _CASE_COLUMNS):
            raise ValueError(
                f"Metadata file {metadata_file} has no case column (expected one of {list(_CASE_COLUMNS)}); "
                f"columns found: {columns}."
            )
    else:
        raise ValueError(f"Metadata file {metadata_file} has an unknown extension; use .csv, .tsv or .json.")
    table: dict[str, dict[str, Any]] = {}
    for row in rows:
        row = {str(k).strip(): _coerce(v) for k, v in row.items() if k is not None}
        key = next((c for c in _CASE_COLUMNS if c in row), None)
        if key is None:
            raise ValueError(
                f"Metadata file {metadata_file} has no case column (expected one of {list(_CASE_COLUMNS)}); "
                f"columns found: {sorted(row)}."
            )
        if row[key] is None:
            continue
        case = str(row.pop(key)).strip()
        row.pop("case_id", None)
        if case in table:
            raise ValueError(f"Metadata file {metadata_file} lists case '{case}' more than once.")
        table[case] = row
    return table


def build_autopet_datalist(
    dataset_dir: str, metadata_file: str | None = None, require_labels: bool = False, images_subdir: str = "imagesTr"
) -> list[dict[str, Any]]:
    """Build a MONAI-style datalist of PET/CT cases in the AutoPET III nnU-Net layout.

    Each item is ``{"case", "ct", "pet", "prompt"}`` plus ``"label"`` when ``labelsTr/<case>.nii[.gz]``
    exists, plus every metadata column of the case (``tracer``, ``diagnosis``, ``age``, ``sex``, ``stage``,
    ...) when a metadata table lists it. Paths are absolute. The prompt is
    :func:`medfm.data.prompt.build_prompt` of the case's tracer, diagnosis, age and sex; cases absent from
    the table (or without a table) get the all-``unknown`` prompt and no metadata keys. Table values that
    spell numbers become ints/floats and empty cells become ``None``.

    Args:
        dataset_dir: dataset root holding ``imagesTr`` (and optionally ``labelsTr``, ``metadata.csv``).
        metadata_file: metadata table (``.csv``, ``.tsv`` or ``.json`` list of objects) with a ``case`` or
            ``case_id`` column; ``None`` uses ``<dataset_dir>/metadata.csv`` if it exists.
        require_labels: raise if a case has no lesion mask.
        images_subdir: folder of the images (``imagesTs`` for a test set in nnU-Net's layout).

    Returns:
        The datalist, sorted by case id.

    Raises:
        FileNotFoundError: ``dataset_dir`` or an explicitly given ``metadata_file`` does not exist.
        ValueError: no case found, a case lacks its CT or PET, a label is missing while
            ``require_labels``, or the metadata table is malformed.
    """
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"PET/CT dataset directory {dataset_dir} does not exist (or is not a directory).")
    root = os.path.abspath(dataset_dir)
    if metadata_file is not None:
        if not os.path.isfile(metadata_file):
            raise FileNotFoundError(f"Metadata file {metadata_file} does not exist.")
    elif os.path.isfile(os.path.join(root, "metadata.csv")):
        metadata_file = os.path.join(root, "metadata.csv")
    table = _read_metadata(metadata_file) if metadata_file is not None else {}

    ct, pet = find_petct_images(root, images_subdir)
    if not ct and not pet:
        expected = _EXPECTED_LAYOUT.replace("imagesTr", images_subdir)
        raise ValueError(f"Empty datalist: no PET/CT case found in {root}; expected {expected}.")
    for case in sorted(set(ct) ^ set(pet)):
        have, miss = ("CT", "PET") if case in ct else ("PET", "CT")
        channel = PET_CHANNEL if miss == "PET" else CT_CHANNEL
        raise ValueError(
            f"Case '{case}' in {root} has a {have} file but no {miss} file "
            f"(missing imagesTr/{case}_{channel}.nii.gz)."
        )

    labels_subdir = images_subdir.replace("images", "labels", 1)
    datalist: list[dict[str, Any]] = []
    for case in sorted(ct):
        item: dict[str, Any] = {"case": case, "ct": ct[case], "pet": pet[case]}
        label = next(
            (p for p in (os.path.join(root, labels_subdir, case + e) for e in _NIFTI_EXTS) if os.path.isfile(p)), None
        )
        if label is not None:
            item["label"] = label
        elif require_labels:
            raise ValueError(
                f"Case '{case}' in {root} has no lesion mask (missing {labels_subdir}/{case}.nii.gz) "
                "and require_labels=True."
            )
        meta = table.get(case, {})
        item["prompt"] = build_prompt(meta.get("tracer"), meta.get("diagnosis"), meta.get("age"), meta.get("sex"))
        item.update({k: v for k, v in meta.items() if k not in _RESERVED_KEYS})
        datalist.append(item)
    return datalist


def split_datalist(
    datalist: Sequence[dict[str, Any]], val_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split a datalist into training and validation parts, deterministically for a seed.

    ``round(len * val_fraction)`` items go to validation (at least one when ``val_fraction > 0`` and the
    list has two or more items, and never all of them); both parts keep the input order.

    Args:
        datalist: items to split.
        val_fraction: fraction for validation, in ``[0, 1)``.
        seed: seed of the shuffle that picks the validation items.

    Returns:
        ``(train, val)``.

    Raises:
        ValueError: ``val_fraction`` is outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    n = len(datalist)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    else:
        n_val = min(n_val, max(n - 1, 0))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [dict(d) for i, d in enumerate(datalist) if i not in val_idx]
    val = [dict(d) for i, d in enumerate(datalist) if i in val_idx]
    return train, val
