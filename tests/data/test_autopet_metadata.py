"""AutoPET III clinical tables matched to case ids, prompt checks for ContextAlign, held-out split exclusion."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfm.data import (
    build_autopet_datalist,
    exclude_split_cases,
    fratmae_pretraining_datalist,
    require_informative_prompts,
    tracer_from_case_id,
)

FDG_A1 = "fdg_01140d52d8_08-13-2005-NA-PET-CT Ganzkoerper  primaer mit KM-56839"
FDG_A2 = "fdg_01140d52d8_03-02-2006-NA-PET-CT Ganzkoerper  primaer mit KM-11111"
FDG_B = "fdg_0b98dbe00d_10-12-2003-NA-PET-CT Ganzkoerper  primaer mit KM-71208"
PSMA_C = "psma_95b833d46f153cd2_2018-04-16"


def _case(root: Path, case: str) -> None:
    for ch in ("0000", "0001"):
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        path = str(root / "imagesTr" / f"{case}_{ch}.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), path)


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _fdg_rows(patient: str, folder: str, date: str, diagnosis: str, age: str, sex: str) -> list[dict]:
    """One row per DICOM series (CT, PET, SEG), as the challenge's table has them."""
    return [
        {"Subject ID": f"PETCT_{patient}", "Study Date": date, "diagnosis": diagnosis, "age": age, "sex": sex,
         "File Location": f"./FDG-PET-CT-Lesions/PETCT_{patient}/{folder}/{series}"}
        for series in ("2.000000-CT-1", "3.000000-PET-2", "SEG-3")
    ]  # fmt: skip


@pytest.fixture
def autopet(tmp_path: Path) -> Path:
    for case in (FDG_A1, FDG_A2, FDG_B, PSMA_C):
        _case(tmp_path, case)
    rows = _fdg_rows("01140d52d8", FDG_A1.split("_", 2)[2], "08-13-2005", "LUNG_CANCER", "061Y", "F")
    rows += _fdg_rows("01140d52d8", FDG_A2.split("_", 2)[2], "03-02-2006", "NEGATIVE", "062Y", "F")
    rows += _fdg_rows("0b98dbe00d", FDG_B.split("_", 2)[2], "10-12-2003", "MELANOMA", "047Y", "M")
    _write(tmp_path / "fdg_metadata.csv", rows)
    _write(tmp_path / "psma_metadata.csv", [
        {"Subject ID": "PSMA_95b833d46f153cd2", "Study Date": "2018-04-16", "age": "70", "pet_radionuclide": "68Ga"},
        {"Subject ID": "PSMA_95b833d46f153cd2", "Study Date": "2019-01-01", "age": "71", "pet_radionuclide": "68Ga"},
    ])  # fmt: skip
    return tmp_path


def test_tracer_from_case_id():
    assert [tracer_from_case_id(c) for c in (FDG_A1, PSMA_C, "PSMA_x_2020-01-01", "demo_000")] == [
        "FDG", "PSMA", "PSMA", None,
    ]  # fmt: skip


def test_challenge_tables_found_beside_images_and_matched_per_study(autopet):
    prompts = {d["case"]: d["prompt"] for d in build_autopet_datalist(str(autopet))}
    assert prompts == {
        FDG_A1: "<tracer> 18F FDG <diagnosis> lung cancer <age> 61 <sex> F",
        FDG_A2: "<tracer> 18F FDG <diagnosis> negative <age> 62 <sex> F",  # same patient, other study
        FDG_B: "<tracer> 18F FDG <diagnosis> melanoma <age> 47 <sex> M",
        PSMA_C: "<tracer> 68Ga PSMA <diagnosis> prostate cancer <age> 70 <sex> M",
    }


def test_matching_by_study_date_without_file_location(autopet):
    rows = list(csv.DictReader(open(autopet / "fdg_metadata.csv")))
    rows = [{k: v for k, v in r.items() if k != "File Location"} for r in rows]
    _write(autopet / "fdg_metadata.csv", rows)
    prompts = {d["case"]: d["prompt"] for d in build_autopet_datalist(str(autopet))}
    assert "lung cancer <age> 61" in prompts[FDG_A1] and "negative <age> 62" in prompts[FDG_A2]


def test_unmatched_cases_are_named(autopet):
    _case(autopet, "fdg_ffffffffff_01-01-2001-NA-PET-CT")
    with pytest.raises(ValueError, match=r"1 of 5 cases match no study.*fdg_ffffffffff_01-01-2001-NA-PET-CT"):
        build_autopet_datalist(str(autopet))
    (autopet / "psma_metadata.csv").unlink()  # the PSMA case has no table to match now
    with pytest.raises(ValueError, match=PSMA_C):
        build_autopet_datalist(str(autopet), metadata_file=str(autopet / "fdg_metadata.csv"))


def test_disagreeing_series_rows_are_an_error(autopet):
    rows = list(csv.DictReader(open(autopet / "fdg_metadata.csv")))
    rows[1]["age"] = "070Y"
    _write(autopet / "fdg_metadata.csv", rows)
    with pytest.raises(ValueError, match="disagree"):
        build_autopet_datalist(str(autopet))


def test_without_tables_the_tracer_comes_from_the_case_id(tmp_path):
    for case in (FDG_A1, PSMA_C):
        _case(tmp_path, case)
    prompts = [d["prompt"] for d in build_autopet_datalist(str(tmp_path))]
    assert prompts == [
        "<tracer> 18F FDG <diagnosis> unknown <age> unknown <sex> unknown",
        "<tracer> 18F PSMA <diagnosis> unknown <age> unknown <sex> unknown",
    ]


def test_context_align_refuses_identical_prompts(tmp_path):
    for case in ("case_a", "case_b", "case_c"):
        _case(tmp_path, case)
    with pytest.raises(ValueError, match=r"ContextAlign is on but all 3 cases .* same prompt.*--context_align False"):
        fratmae_pretraining_datalist(str(tmp_path), context_align=True)
    assert len(fratmae_pretraining_datalist(str(tmp_path), context_align=False)) == 3
    assert len(require_informative_prompts([{"prompt": "a"}, {"prompt": "b"}])) == 2


def test_held_out_split_cases_leave_pre_training(tmp_path):
    datalist = [{"case": c} for c in ("a", "b", "c", "d")]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"seed": 0, "train": ["a"], "val": ["b"], "test": ["c"]}))
    assert [d["case"] for d in exclude_split_cases(datalist, str(split))] == ["a", "d"]
    assert exclude_split_cases(datalist, None) == datalist
    assert exclude_split_cases(datalist, "none") == datalist
    split.write_text(json.dumps({"train": [], "val": ["x", "y"]}))
    with pytest.raises(ValueError, match="another dataset"):
        exclude_split_cases(datalist, str(split))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        exclude_split_cases(datalist, str(tmp_path / "missing.json"))
    split.write_text(json.dumps([["a"]]))
    with pytest.raises(ValueError, match="JSON object"):
        exclude_split_cases(datalist, str(split))
