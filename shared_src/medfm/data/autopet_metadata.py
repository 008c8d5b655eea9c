"""AutoPET III clinical metadata (``fdg_metadata.csv``, ``psma_metadata.csv``) matched to nnU-Net case ids.

AutoPET III ships two clinical tables beside ``imagesTr``; their rows are per DICOM series (several per study) and
name patients and studies differently from the nnU-Net case ids:

- FDG cases are ``fdg_<patient>_<study folder>`` (e.g. ``fdg_01140d52d8_08-13-2005-NA-PET-CT Ganzkoerper  primaer
  mit KM-56839``). ``fdg_metadata.csv`` has ``Subject ID`` = ``PETCT_<patient>``, ``File Location`` =
  ``./FDG-PET-CT-Lesions/PETCT_<patient>/<study folder>/<series folder>``, ``Study Date``, ``diagnosis``
  (``MELANOMA``, ``LYMPHOMA``, ``LUNG_CANCER``, ``NEGATIVE``), ``age`` (``061Y``) and ``sex`` (``M`` / ``F``).
- PSMA cases are ``psma_<patient>_<YYYY-MM-DD>``. ``psma_metadata.csv`` has ``Subject ID`` = ``PSMA_<patient>``,
  ``Study Date``, ``age`` and ``pet_radionuclide`` (``18F`` / ``68Ga``); it has no sex or diagnosis column: the
  cohort is men with prostate cancer, so those cases get sex ``M`` and diagnosis ``prostate cancer``.

A case is matched to its study by patient id and then by study folder (``File Location``), else by study date (the
date that starts the case id's study part), else by the patient's only study. The tracer always comes from the
case-id prefix (``fdg_`` / ``psma_``) and, for PSMA, the radionuclide.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["autopet_clinical_metadata", "is_autopet_clinical_table", "tracer_from_case_id"]

SUBJECT_COLUMN = "Subject ID"
_CASE_RE = re.compile(r"^(?P<tracer>fdg|psma)_(?P<patient>[^_]+)_(?P<study>.+)$", re.IGNORECASE)
_SUBJECT_PREFIX = {"fdg": "PETCT_", "psma": "PSMA_"}
_DATE_RES = (
    re.compile(r"^(?P<m>\d{1,2})-(?P<d>\d{1,2})-(?P<y>\d{4})"),  # FDG study folders: MM-DD-YYYY-...
    re.compile(r"^(?P<y>\d{4})-(?P<m>\d{1,2})-(?P<d>\d{1,2})"),  # PSMA case ids: YYYY-MM-DD
    re.compile(r"^(?P<y>\d{4})(?P<m>\d{2})(?P<d>\d{2})$"),  # DICOM dates
)


def tracer_from_case_id(case: str) -> str | None:
    """``"FDG"`` for ``fdg_…``, ``"PSMA"`` for ``psma_…`` (AutoPET III case ids, any case), else None."""
    m = _CASE_RE.match(case)
    return m["tracer"].upper() if m else None


def is_autopet_clinical_table(columns: Iterable[str]) -> bool:
    """Whether a table's header is AutoPET's clinical metadata (it has a ``Subject ID`` column)."""
    return SUBJECT_COLUMN in {str(c).strip() for c in columns}


def _date(text: Any) -> tuple[int, int, int] | None:
    s = str(text or "").strip()
    for pattern in _DATE_RES:
        m = pattern.match(s)
        if m:
            return int(m["y"]), int(m["m"]), int(m["d"])
    return None


def _age(value: Any) -> int | None:
    m = re.match(r"^\s*0*(\d+(?:\.\d+)?)\s*[Yy]?\s*$", str(value or ""))
    return int(round(float(m[1]))) if m else None


def _study_folder(location: Any, subject: str) -> str | None:
    parts = [p for p in re.split(r"[\\/]", str(location or "")) if p and p != "."]
    return parts[parts.index(subject) + 1] if subject in parts and parts.index(subject) + 1 < len(parts) else None


def _read_rows(path: str) -> list[dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.lower().endswith((".tsv", ".tab")) else ",")
        rows = [{str(k).strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
        columns = [str(c).strip() for c in reader.fieldnames or []]
    if not is_autopet_clinical_table(columns):
        raise ValueError(f"{path} is not an AutoPET clinical table: no '{SUBJECT_COLUMN}' column (columns: {columns}).")
    return rows


def _studies(path: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """``{(tracer, patient): [study, ...]}``; a study holds its folder, date and prompt fields (one per study)."""
    out: dict[tuple[str, str], dict[tuple, dict[str, Any]]] = {}
    for row in _read_rows(path):
        subject = row.get(SUBJECT_COLUMN, "")
        tracer = next((t for t, p in _SUBJECT_PREFIX.items() if subject.upper().startswith(p)), None)
        if tracer is None:
            raise ValueError(f"{path}: Subject ID {subject!r} starts with neither 'PETCT_' (FDG) nor 'PSMA_' (PSMA).")
        patient = subject[len(_SUBJECT_PREFIX[tracer]) :]
        folder = _study_folder(row.get("File Location"), subject)
        date = _date(row.get("Study Date")) or (_date(folder) if folder else None)
        if tracer == "fdg":
            fields = {"tracer": "FDG", "diagnosis": row.get("diagnosis") or None, "sex": row.get("sex") or None}
        else:
            nuclide = row.get("pet_radionuclide", "").replace("-", "").strip()
            fields = {"tracer": f"{nuclide} PSMA" if nuclide else "PSMA", "diagnosis": "prostate cancer", "sex": "M"}
        fields["age"] = _age(row.get("age"))
        key = (folder, date) if folder else (None, date)
        studies = out.setdefault((tracer, patient), {})
        if key in studies and studies[key]["fields"] != fields:
            raise ValueError(f"{path}: the rows of {subject} study {folder or date} disagree: "
                             f"{studies[key]['fields']} vs {fields}.")  # fmt: skip
        studies[key] = {"folder": folder, "date": date, "fields": fields}
    return {k: list(v.values()) for k, v in out.items()}


def _match(case: str, tables: dict[tuple[str, str], list[dict[str, Any]]]) -> dict[str, Any] | None:
    m = _CASE_RE.match(case)
    if m is None:
        return None
    studies = tables.get((m["tracer"].lower(), m["patient"]), [])
    date = _date(m["study"])
    for key, value in (("folder", m["study"]), ("date", date)):
        hits = [s for s in studies if value is not None and s[key] == value]
        if len(hits) == 1:
            return hits[0]["fields"]
    return studies[0]["fields"] if len({(s["folder"], s["date"]) for s in studies}) == 1 else None


def autopet_clinical_metadata(case_ids: Sequence[str], table_files: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Prompt metadata (tracer, diagnosis, age, sex) of every case from AutoPET III's clinical tables.

    Args:
        case_ids: nnU-Net case ids (``fdg_<patient>_<study>``, ``psma_<patient>_<date>``).
        table_files: ``fdg_metadata.csv`` and / or ``psma_metadata.csv`` (or the same tables as TSV).

    Returns:
        ``{case: {"tracer", "diagnosis", "age", "sex"}}`` for every case.

    Raises:
        ValueError: a table is malformed, or cases match no row (all of them named, with the tables read).
    """
    tables: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in table_files:
        for key, studies in _studies(path).items():
            tables.setdefault(key, []).extend(studies)
    out, unmatched = {}, []
    for case in case_ids:
        fields = _match(case, tables)
        if fields is None:
            unmatched.append(case)
        else:
            out[case] = dict(fields)
    if unmatched:
        shown = ", ".join(unmatched[:20]) + (f" and {len(unmatched) - 20} more" if len(unmatched) > 20 else "")
        raise ValueError(
            f"{len(unmatched)} of {len(case_ids)} cases match no study of the clinical tables {list(table_files)}: "
            f"{shown}. Case ids must be fdg_<patient>_<study folder> (FDG, 'Subject ID' PETCT_<patient>) or "
            "psma_<patient>_<YYYY-MM-DD> (PSMA, 'Subject ID' PSMA_<patient>); give both fdg_metadata.csv and "
            "psma_metadata.csv when the dataset holds both tracers."
        )
    return out
