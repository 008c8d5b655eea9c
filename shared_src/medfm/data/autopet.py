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

from medfm.transforms.prompt import build_prompt

from .autopet_metadata import autopet_clinical_metadata, is_autopet_clinical_table, tracer_from_case_id

__all__ = [
    "build_autopet_datalist", "exclude_split_cases", "fratmae_pretraining_datalist", "require_informative_prompts",
    "split_datalist", "find_petct_images", "CT_CHANNEL", "PET_CHANNEL",
]  # fmt: skip

CT_CHANNEL = "0000"
PET_CHANNEL = "0001"
_NIFTI_EXTS = (".nii.gz", ".nii")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ext>\.nii\.gz|\.nii)$")
_CASE_COLUMNS = ("case", "case_id")
_RESERVED_KEYS = ("case", "ct", "pet", "label", "prompt")
_EXPECTED_LAYOUT = "imagesTr/<case>_0000.nii[.gz] (CT) and imagesTr/<case>_0001.nii[.gz] (PET)"
_AUTOPET_TABLES = ("fdg_metadata.csv", "psma_metadata.csv")  # AutoPET III's clinical tables, beside imagesTr


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


def _header(path: str) -> list[str]:
    if path.lower().endswith(".json"):
        return []
    with open(path, encoding="utf-8-sig", newline="") as f:
        first = f.readline()
    return [c.strip() for c in next(csv.reader([first], delimiter="," if path.lower().endswith(".csv") else "\t"), [])]


def _metadata_files(root: str, metadata_file: str | Sequence[str] | None) -> list[str]:
    if metadata_file is None:
        found = [os.path.join(root, n) for n in ("metadata.csv", *_AUTOPET_TABLES)]
        return [p for p in found if os.path.isfile(p)]
    files = [metadata_file] if isinstance(metadata_file, (str, os.PathLike)) else list(metadata_file)
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Metadata file {path} does not exist.")
    return [str(p) for p in files]


def build_autopet_datalist(
    dataset_dir: str,
    metadata_file: str | Sequence[str] | None = None,
    require_labels: bool = False,
    images_subdir: str = "imagesTr",
) -> list[dict[str, Any]]:
    """Build a MONAI-style datalist of PET/CT cases in the AutoPET III nnU-Net layout.

    Each item is ``{"case", "ct", "pet", "prompt"}`` plus ``"label"`` when ``labelsTr/<case>.nii[.gz]``
    exists, plus every metadata column of the case (``tracer``, ``diagnosis``, ``age``, ``sex``, ``stage``,
    ...) when a metadata table lists it. Paths are absolute. The prompt is
    :func:`medfm.transforms.prompt.build_prompt` of the case's tracer, diagnosis, age and sex. The tracer falls back
    to the AutoPET III case-id prefix (``fdg_`` -> FDG, ``psma_`` -> PSMA); other unknown fields are
    ``unknown``. Table values that spell numbers become ints/floats and empty cells become ``None``.

    Two kinds of metadata table are read, told apart by their header:

    - a table of our own (``.csv``, ``.tsv`` or ``.json`` list of objects) with a ``case`` or ``case_id`` column
      and any of ``tracer``, ``diagnosis``, ``age``, ``sex``, ``stage``; cases absent from it keep their defaults;
    - AutoPET III's clinical tables ``fdg_metadata.csv`` / ``psma_metadata.csv`` (a ``Subject ID`` column),
      matched to case ids by patient and study (:mod:`medfm.data.autopet_metadata`); there every case must
      match, and unmatched cases are an error naming them.

    Args:
        dataset_dir: dataset root holding ``imagesTr`` (and optionally ``labelsTr`` and metadata tables).
        metadata_file: one table or a list of tables; ``None`` reads ``metadata.csv``, ``fdg_metadata.csv`` and
            ``psma_metadata.csv`` from ``dataset_dir``, those that exist.
        require_labels: raise if a case has no lesion mask.
        images_subdir: folder of the images (``imagesTs`` for a test set in nnU-Net's layout).

    Returns:
        The datalist, sorted by case id.

    Raises:
        FileNotFoundError: ``dataset_dir`` or an explicitly given metadata file does not exist.
        ValueError: no case found, a case lacks its CT or PET, a label is missing while
            ``require_labels``, a metadata table is malformed, or cases match no row of AutoPET's tables.
    """
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"PET/CT dataset directory {dataset_dir} does not exist (or is not a directory).")
    root = os.path.abspath(dataset_dir)
    files = _metadata_files(root, metadata_file)
    clinical = [p for p in files if is_autopet_clinical_table(_header(p))]
    table: dict[str, dict[str, Any]] = {}
    for path in (p for p in files if p not in clinical):
        for case, row in _read_metadata(path).items():
            if case in table:
                raise ValueError(f"Metadata file {path} lists case '{case}' that another table lists too.")
            table[case] = row

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
    clinical_rows = autopet_clinical_metadata(sorted(ct), clinical) if clinical else {}
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
        meta = {**clinical_rows.get(case, {}), **{k: v for k, v in table.get(case, {}).items() if v is not None}}
        if meta.get("tracer") is None and tracer_from_case_id(case):
            meta["tracer"] = tracer_from_case_id(case)
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


def require_informative_prompts(datalist: Sequence[dict[str, Any]], source: str = "") -> list[dict[str, Any]]:
    """The datalist itself, after checking that ContextAlign can learn from its prompts.

    With one prompt for every case (no metadata: ``"<tracer> unknown <diagnosis> unknown …"``) the image-text
    InfoNCE has nothing to align: every text embedding is the same and the loss is a constant. That is an error
    here, not a silent no-op.

    Raises:
        ValueError: fewer than two distinct prompts; the message names the prompt, the data and the remedies.
    """
    prompts = {d.get("prompt") for d in datalist}
    if len(datalist) > 1 and len(prompts) < 2:
        where = f" in {source}" if source else ""
        raise ValueError(
            f"ContextAlign is on but all {len(datalist)} cases{where} have the same prompt {next(iter(prompts))!r}: "
            "the image-text loss would learn nothing. Give a metadata table (--metadata_file: a table with case, "
            "tracer, diagnosis, age, sex columns, or AutoPET III's fdg_metadata.csv / psma_metadata.csv), or turn "
            "ContextAlign off (--context_align False)."
        )
    return list(datalist)


def exclude_split_cases(
    datalist: Sequence[dict[str, Any]], split_file: str | None, keep: Sequence[str] = ("train",)
) -> list[dict[str, Any]]:
    """Drop the cases that a split file holds out (e.g. the ``val`` / ``test`` cases of a fine-tuning split).

    Pre-training on ``imagesTr`` would otherwise see the cases later used to evaluate the fine-tuned model. The split
    file is a JSON object of case-id lists, such as the ``split.json`` every fine-tuning run records
    (``{"train": [...], "val": [...]}``) or one with a ``test`` list; every list except those named in ``keep`` is
    excluded.

    Args:
        datalist: items with a ``case`` key.
        split_file: the JSON split; None (or ``""`` / ``"none"``) excludes nothing.
        keep: keys of the lists whose cases stay.

    Raises:
        FileNotFoundError: the split file does not exist.
        ValueError: it is not a JSON object of case lists, or none of its held-out cases is in the datalist
            (likely a split of another dataset).
    """
    if split_file is None or str(split_file).strip().lower() in ("", "none"):
        return list(datalist)
    if not os.path.isfile(split_file):
        raise FileNotFoundError(f"Split file {split_file} does not exist.")
    with open(split_file, encoding="utf-8") as f:
        split = json.load(f)
    if not isinstance(split, dict):
        raise ValueError(
            f"Split file {split_file} must hold a JSON object of case-id lists, got {type(split).__name__}."
        )
    held_out = {str(c) for k, v in split.items() if k not in keep and isinstance(v, list) for c in v}
    cases = {d["case"] for d in datalist}
    if held_out and not held_out & cases:
        raise ValueError(f"None of the {len(held_out)} held-out cases of {split_file} is in the datalist "
                         f"(e.g. {sorted(held_out)[:3]}): is it a split of another dataset?")  # fmt: skip
    return [d for d in datalist if d["case"] not in held_out]


def fratmae_pretraining_datalist(
    dataset_dir: str,
    metadata_file: str | Sequence[str] | None = None,
    context_align: bool = True,
    exclude_split_file: str | None = None,
) -> list[dict[str, Any]]:
    """FratMAE's pre-training datalist: :func:`build_autopet_datalist`, less the cases held out by
    ``exclude_split_file`` (:func:`exclude_split_cases`), with the prompts checked when ContextAlign is on
    (:func:`require_informative_prompts`)."""
    datalist = exclude_split_cases(build_autopet_datalist(dataset_dir, metadata_file), exclude_split_file)
    if not datalist:
        raise ValueError(f"Empty datalist: every case of {dataset_dir} is held out by {exclude_split_file}.")
    return require_informative_prompts(datalist, dataset_dir) if context_align else datalist
