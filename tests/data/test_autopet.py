"""Tests of the AutoPET III datalist builder and the seeded split."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfm.data.autopet import build_autopet_datalist, split_datalist

UNKNOWN_PROMPT = "<tracer> unknown <diagnosis> unknown <age> unknown <sex> unknown"


def _nifti(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(path))
    return str(path)


def _case(root: Path, case: str, ct: bool = True, pet: bool = True, label: bool = True, ext: str = ".nii.gz") -> None:
    if ct:
        _nifti(root / "imagesTr" / f"{case}_0000{ext}")
    if pet:
        _nifti(root / "imagesTr" / f"{case}_0001{ext}")
    if label:
        _nifti(root / "labelsTr" / f"{case}{ext}")


def test_pairs_ct_pet_label_sorted_and_absolute(tmp_path: Path) -> None:
    _case(tmp_path, "pt_b")
    _case(tmp_path, "pt_a", label=False, ext=".nii")
    _case(tmp_path, "pt_c", ext=".nii")
    (tmp_path / "imagesTr" / "pt_a_0002.nii.gz").write_bytes(b"")  # other channel: ignored
    (tmp_path / "imagesTr" / "notes.txt").write_text("x")
    dl = build_autopet_datalist(str(tmp_path))
    assert [d["case"] for d in dl] == ["pt_a", "pt_b", "pt_c"]
    root = os.path.abspath(tmp_path)
    assert dl[0]["ct"] == os.path.join(root, "imagesTr", "pt_a_0000.nii")
    assert dl[0]["pet"] == os.path.join(root, "imagesTr", "pt_a_0001.nii")
    assert "label" not in dl[0]
    assert dl[1]["ct"] == os.path.join(root, "imagesTr", "pt_b_0000.nii.gz")
    assert dl[1]["pet"] == os.path.join(root, "imagesTr", "pt_b_0001.nii.gz")
    assert dl[1]["label"] == os.path.join(root, "labelsTr", "pt_b.nii.gz")
    assert dl[2]["label"] == os.path.join(root, "labelsTr", "pt_c.nii")
    assert all(os.path.isabs(d[k]) and os.path.isfile(d[k]) for d in dl for k in ("ct", "pet"))
    assert all(d["prompt"] == UNKNOWN_PROMPT for d in dl)
    assert "tracer" not in dl[0]


def test_default_metadata_csv_gives_prompts_and_extra_columns(tmp_path: Path) -> None:
    for c in ("c1", "c2", "c3"):
        _case(tmp_path, c)
    (tmp_path / "metadata.csv").write_text(
        "case,tracer,diagnosis,age,sex,stage\n"
        "c1,FDG,melanoma,61,M,1\n"
        "c2,PSMA,prostate cancer,70.4,male,0\n"
        "c9,FDG,lymphoma,30,F,0\n"  # not on disk: ignored
    )
    dl = {d["case"]: d for d in build_autopet_datalist(str(tmp_path))}
    assert sorted(dl) == ["c1", "c2", "c3"]
    assert dl["c1"]["prompt"] == "<tracer> 18F FDG <diagnosis> melanoma <age> 61 <sex> M"
    assert dl["c2"]["prompt"] == "<tracer> 18F PSMA <diagnosis> prostate cancer <age> 70 <sex> M"
    assert (dl["c1"]["tracer"], dl["c1"]["diagnosis"], dl["c1"]["age"], dl["c1"]["sex"]) == ("FDG", "melanoma", 61, "M")
    assert dl["c1"]["stage"] == 1 and dl["c2"]["stage"] == 0
    assert dl["c3"]["prompt"] == UNKNOWN_PROMPT and "stage" not in dl["c3"]


def test_explicit_tsv_with_case_id_and_json_tables(tmp_path: Path) -> None:
    _case(tmp_path / "ds", "x1")
    _case(tmp_path / "ds", "x2")
    tsv = tmp_path / "meta.tsv"
    tsv.write_text("case_id\ttracer\tdiagnosis\tage\tsex\nx2\tFDG\tlung cancer\t\tF\n")
    dl = build_autopet_datalist(str(tmp_path / "ds"), metadata_file=str(tsv))
    assert dl[0]["prompt"] == UNKNOWN_PROMPT
    assert dl[1]["prompt"] == "<tracer> 18F FDG <diagnosis> lung cancer <age> unknown <sex> F"
    js = tmp_path / "meta.json"
    js.write_text(json.dumps([{"case": "x1", "tracer": "FDG", "diagnosis": "lymphoma", "age": 33, "sex": "F"}]))
    dl = build_autopet_datalist(str(tmp_path / "ds"), metadata_file=str(js))
    assert dl[0]["prompt"] == "<tracer> 18F FDG <diagnosis> lymphoma <age> 33 <sex> F"
    assert dl[1]["prompt"] == UNKNOWN_PROMPT


def test_missing_dataset_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_autopet_datalist(str(missing))


def test_empty_dir_names_dir_and_layout(tmp_path: Path) -> None:
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(ValueError, match=re.escape(os.path.abspath(tmp_path))) as info:
        build_autopet_datalist(str(tmp_path))
    assert "empty datalist" in str(info.value).lower() and "_0000" in str(info.value)


def test_ct_without_pet_and_pet_without_ct(tmp_path: Path) -> None:
    _case(tmp_path / "a", "good")
    _case(tmp_path / "a", "lonely_ct", pet=False)
    with pytest.raises(ValueError, match=r"lonely_ct.*no PET.*lonely_ct_0001"):
        build_autopet_datalist(str(tmp_path / "a"))
    _case(tmp_path / "b", "lonely_pet", ct=False)
    with pytest.raises(ValueError, match=r"lonely_pet.*no CT.*lonely_pet_0000"):
        build_autopet_datalist(str(tmp_path / "b"))


def test_require_labels(tmp_path: Path) -> None:
    _case(tmp_path, "with_label")
    _case(tmp_path, "no_label", label=False)
    assert len(build_autopet_datalist(str(tmp_path))) == 2
    with pytest.raises(ValueError, match=r"no_label.*labelsTr"):
        build_autopet_datalist(str(tmp_path), require_labels=True)


def test_duplicate_extensions_rejected(tmp_path: Path) -> None:
    _case(tmp_path, "dup")
    _nifti(tmp_path / "imagesTr" / "dup_0000.nii")
    with pytest.raises(ValueError, match=r"dup.*dup_0000\.nii"):
        build_autopet_datalist(str(tmp_path))


def test_metadata_errors(tmp_path: Path) -> None:
    _case(tmp_path, "c1")
    missing = tmp_path / "missing.csv"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_autopet_datalist(str(tmp_path), metadata_file=str(missing))
    bad = tmp_path / "bad.csv"
    bad.write_text("patient,tracer\nc1,FDG\n")
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ".*case column"):
        build_autopet_datalist(str(tmp_path), metadata_file=str(bad))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text(json.dumps([{"patient": "c1"}]))
    with pytest.raises(ValueError, match=re.escape(str(bad_json))):
        build_autopet_datalist(str(tmp_path), metadata_file=str(bad_json))


def test_split_is_a_seeded_partition() -> None:
    items = [{"case": f"c{i:02d}"} for i in range(20)]
    train, val = split_datalist(items, 0.25, seed=3)
    assert len(val) == 5 and len(train) == 15
    assert sorted(d["case"] for d in train + val) == [d["case"] for d in items]
    # input order is kept within each part
    assert [d["case"] for d in train] == sorted(d["case"] for d in train)
    again = split_datalist(items, 0.25, seed=3)
    assert [d["case"] for d in again[1]] == [d["case"] for d in val]
    others = {tuple(d["case"] for d in split_datalist(items, 0.25, seed=s)[1]) for s in range(4, 10)}
    assert len(others | {tuple(d["case"] for d in val)}) > 1
    assert split_datalist(items, 0.0, seed=0) == (items, [])
    assert [len(p) for p in split_datalist(items[:3], 0.01, seed=0)] == [2, 1]  # at least one validation item


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match=r"val_fraction.*\[0, 1\)"):
        split_datalist([{"case": "a"}, {"case": "b"}], fraction, seed=0)
