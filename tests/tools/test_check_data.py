"""tools/check_data.py: clean demo data passes; every damaged file is reported with its kind, the exit status is 1,
``--json`` writes the report (damaged files: tests/bad_files.py)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from medfm.data import (
    generate_synthetic_midol,
    generate_synthetic_panfm,
    generate_synthetic_petct,
    generate_synthetic_spad,
)

from .. import bad_files
from . import load_tool

check = load_tool("check_data")
PANFM_SHAPES = {"brain": [16, 16, 16], "heart": [16, 16, 8], "adipose": [16, 16, 8], "liver": [16, 16, 8],
                "kidney": [8, 8, 8], "spleen": [8, 8, 8], "pancreas": [16, 8, 8]}  # fmt: skip


def _run(capsys, *argv: str) -> tuple[int, str]:
    rc = check.main([*argv, "--workers", "1", "--no-progress"])
    return rc, capsys.readouterr().out


def _kinds(report_path: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for p in json.load(open(report_path))["problems"]:
        out.setdefault(os.path.basename(p["file"]), set()).add(p["kind"])
    return out


def test_clean_demo_data_of_every_bundle_passes(tmp_path, capsys):
    spad, midol, petct, panfm = (str(tmp_path / n) for n in ("spad", "midol", "petct", "panfm"))
    generate_synthetic_spad(spad, num_2d=2, num_3d=2, size_2d=32, size_3d=32, seed=0)
    generate_synthetic_midol(midol, per_modality=2, size=32, seed=0)
    generate_synthetic_petct(petct, num_cases=2, shape=(24, 16, 48), spacing=(10.0, 10.0, 20.0), seed=4)
    generate_synthetic_panfm(panfm, num_subjects=3, seed=0, organ_shapes=PANFM_SHAPES)
    for bundle, root, extra in [("spad_vit", spad, []), ("midol_multimodal", midol, ["--masks-subdir", "masks"]),
                                ("fratmae_petct", petct, []), ("panfm_panorgan", panfm, [])]:  # fmt: skip
        rc, out = _run(capsys, bundle, root, *extra)
        assert rc == 0, out
        assert out.rstrip().endswith("OK") and "unreadable          0" in out


def test_damaged_volumes_are_reported_by_kind(tmp_path, capsys):
    """SPAD-ViT layout with generated damage, labels with an unexpected value and a label without image."""
    root = str(tmp_path / "spad")
    generate_synthetic_spad(root, num_2d=1, num_3d=1, size_2d=32, size_3d=32, seed=0)
    images = os.path.join(root, "images")
    good = next(os.path.join(images, n) for n in sorted(os.listdir(images)) if n.endswith(".nii.gz"))
    bad_files.volumes(images, good, prefix="bad_")
    bad_files.images_2d(images, next(os.path.join(images, n) for n in os.listdir(images) if n.endswith(".png")))
    shutil.copy(good, os.path.join(images, "copy_of_good.nii.gz"))
    label = os.path.join(root, "labels", os.path.basename(good))
    bad_files.nifti(label, np.full(bad_files.nib.load(good).shape, 9, np.uint8), bad_files.nib.load(good).affine)
    bad_files.nifti(os.path.join(root, "labels", "orphan.nii.gz"), np.zeros((4, 4, 4), np.uint8))
    report = str(tmp_path / "report.json")
    rc, out = _run(capsys, "spad_vit", root, "--json", report)
    assert rc == 1
    kinds = _kinds(report)
    expected = {
        "bad_truncated_gzip.nii.gz": "unreadable", "bad_nan.nii.gz": "non_finite", "bad_tiny.nii.gz": "too_small",
        "bad_complex.nii.gz": "wrong_dtype", "bad_four_d.nii.gz": "wrong_shape", "truncated_png.png": "unreadable",
        "text_png.png": "unreadable", "tiny_png.png": "too_small", "dicom_truncated.dcm": "unreadable",
        os.path.basename(label): "label_values", "orphan.nii.gz": "missing_pair", "copy_of_good.nii.gz": "duplicate",
    }  # fmt: skip
    for name, kind in expected.items():
        if not os.path.exists(os.path.join(images, name)) and name.endswith(".dcm"):
            continue  # nibabel installed without its test DICOM
        if name == "copy_of_good.nii.gz":  # the later of the two identical files in path order is flagged
            name = max(name, os.path.basename(good))
        assert kind in kinds.get(name, set()), (name, kinds.get(name))
    assert "rgb_png.png" not in kinds  # an 8-bit RGB image is a valid SPAD-ViT input
    data = json.load(open(report))
    unreadable = 3 + os.path.exists(os.path.join(images, "dicom_truncated.dcm"))
    assert data["ok"] is False and data["summary"]["unreadable"] == unreadable and data["summary"]["label_values"] == 1
    assert "label_values        1" in out and "problems found" in out


def test_petct_pairs_grids_and_labels(tmp_path, capsys):
    root = str(tmp_path / "petct")
    generate_synthetic_petct(root, num_cases=4, shape=(24, 16, 48), spacing=(10.0, 10.0, 20.0), seed=4)
    ct1 = os.path.join(root, "imagesTr", "demo_001_0000.nii.gz")
    noise = np.random.default_rng(0).integers(-900, 900, (20, 16, 48)).astype(np.int16)
    bad_files.nifti(ct1, noise, bad_files.nib.load(ct1).affine)  # off the PET grid
    os.remove(os.path.join(root, "imagesTr", "demo_002_0001.nii.gz"))  # CT without PET
    lab = os.path.join(root, "labelsTr", "demo_003.nii.gz")
    img = bad_files.nib.load(lab)
    bad_files.nifti(lab, np.full(img.shape, 3, np.uint8), img.affine)  # class 3 of a two-class task
    report = str(tmp_path / "r.json")
    rc, _ = _run(capsys, "fratmae_petct", root, "--json", report)
    assert rc == 1
    assert _kinds(report) == {"demo_001_0000.nii.gz": {"grid_mismatch"}, "demo_002_0000.nii.gz": {"missing_pair"},
                              "demo_003.nii.gz": {"label_values"}}  # fmt: skip


def test_midol_rgb_mask_and_panfm_missing_organ_file_in_parallel(tmp_path, capsys):
    midol = str(tmp_path / "midol")
    generate_synthetic_midol(midol, per_modality=2, size=32, seed=0)
    mask = os.path.join(midol, "masks", "dermoscopy", sorted(os.listdir(os.path.join(midol, "masks", "dermoscopy")))[0])
    bad_files.png(mask, np.zeros((32, 32, 3), np.uint8))  # RGB where a grey mask is expected
    report = str(tmp_path / "m.json")
    rc = check.main(["midol_multimodal", midol, "--masks-subdir", "masks", "--json", report, "--workers", "2"])
    assert rc == 1 and _kinds(report) == {os.path.basename(mask): {"wrong_shape"}}
    panfm = str(tmp_path / "panfm")
    generate_synthetic_panfm(panfm, num_subjects=3, seed=0, organ_shapes=PANFM_SHAPES)
    organ = sorted(os.listdir(os.path.join(panfm, "organs")))[0]
    os.remove(os.path.join(panfm, "organs", organ))
    rc, out = _run(capsys, "panfm_panorgan", panfm)
    assert rc == 1 and f"missing_pair  {os.path.join(panfm, 'organs', organ)}" in out


def test_not_a_directory(tmp_path, capsys):
    assert check.main(["spad_vit", str(tmp_path / "nope"), "--no-progress"]) == 2


@pytest.mark.parametrize("bundle", ["spad_vit", "fratmae_petct"])
def test_patch_size_comes_from_the_bundle_config(bundle):
    assert check._config_int(bundle, "patch_size", 0) == 16
