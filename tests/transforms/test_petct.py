"""Tests of the PET/CT loader and its checks (medfm.transforms.petct)."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medfm.transforms import LoadPETCTd, check_finite, check_same_grid, count_nonfinite, grid_mismatch

AFFINE = np.array([[2.0, 0, 0, 10.0], [0, 3.0, 0, -20.0], [0, 0, 4.0, 30.0], [0, 0, 0, 1]])
SHAPE = (4, 5, 6)
CASE = "demo_007"


def _write(path, arr, affine=AFFINE) -> str:
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return str(path)


@pytest.fixture
def case(tmp_path):
    rng = np.random.default_rng(0)
    ct = (rng.random(SHAPE) * 2000 - 1000).astype(np.float32)
    pet = (rng.random(SHAPE) * 20).astype(np.float32)
    label = (rng.random(SHAPE) > 0.7).astype(np.uint8)
    data = {
        "case": CASE,
        "ct": _write(tmp_path / f"{CASE}_0000.nii.gz", ct),
        "pet": _write(tmp_path / f"{CASE}_0001.nii.gz", pet),
        "label": _write(tmp_path / f"{CASE}.nii.gz", label),
        "prompt": "<tracer> 18F FDG",
    }
    return data, {"ct": ct, "pet": pet, "label": label}


def _raises(exc, data, *needles, **kwargs):
    """Call LoadPETCTd and check that the message names the case and every needle."""
    with pytest.raises(exc, match=CASE) as info:
        LoadPETCTd(**kwargs)(data)
    msg = str(info.value)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return info


def test_matching_pair_loads(case):
    data, arrays = case
    out = LoadPETCTd()(data)
    for key in ("ct", "pet", "label"):
        assert isinstance(out[key], MetaTensor)
        assert out[key].shape == (1, *SHAPE)
        np.testing.assert_allclose(out[key].affine.numpy(), AFFINE)
        np.testing.assert_array_equal(out[key].as_tensor().numpy()[0], arrays[key])
    assert out["ct"].dtype == out["pet"].dtype == torch.float32
    assert out["label"].dtype == torch.uint8  # the label as stored
    assert out["prompt"] == data["prompt"] and out["case"] == CASE


def test_missing_label(case):
    data, _ = case
    assert LoadPETCTd(label_key=None)(data)["label"] == data["label"]  # not loaded, left as is
    del data["label"]
    assert "label" not in LoadPETCTd()(data)
    _raises(ValueError, data, "no label file", allow_missing_label=False)


def test_shape_mismatch(case, tmp_path):
    data, _ = case
    data["ct"] = _write(tmp_path / "ct_big.nii.gz", np.zeros((4, 5, 7), np.float32))
    _raises(ValueError, data, "shape mismatch", data["ct"], data["pet"], "(4, 5, 7)", "(4, 5, 6)")


def test_label_shape_mismatch(case, tmp_path):
    data, _ = case
    data["label"] = _write(tmp_path / "lab.nii.gz", np.zeros((3, 5, 6), np.uint8))
    _raises(ValueError, data, "shape mismatch", data["label"], "(3, 5, 6)")


def test_affine_mismatch(case, tmp_path):
    data, _ = case
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    data["ct"] = _write(tmp_path / "ct_shift.nii.gz", np.zeros(SHAPE, np.float32), shifted)
    _raises(ValueError, data, "affine mismatch", data["ct"], data["pet"], "10.5")
    assert LoadPETCTd(affine_atol=0.6)(data)["ct"].shape == (1, *SHAPE)  # within tolerance it loads


def test_missing_file(case, tmp_path):
    data, _ = case
    data["pet"] = str(tmp_path / "nope.nii.gz")
    _raises(FileNotFoundError, data, "does not exist", data["pet"])


@pytest.mark.parametrize("content", ["garbage", "truncated_large", "truncated_small"])
def test_corrupt_file(case, tmp_path, content):
    # truncated_small: a gzip'd NIfTI cut in half; MONAI's ITK fallback would silently read garbage from it
    data, _ = case
    size = {"truncated_large": (30, 30, 30), "truncated_small": SHAPE}.get(content)
    if size is None:
        raw = b"this is not a nifti file" * 20
    else:
        full = _write(tmp_path / "full.nii.gz", np.random.default_rng(1).random(size).astype(np.float32))
        raw = open(full, "rb").read()
        raw = raw[: len(raw) // 2]
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(raw)
    data["ct"] = str(bad)
    info = _raises(ValueError, data, "cannot be read", str(bad))
    assert info.value.__cause__ is not None  # re-raised from the reader's exception


@pytest.mark.parametrize("key, bad_value", [("ct", np.nan), ("pet", np.inf), ("pet", -np.inf)])
def test_nonfinite_voxels(case, key, bad_value):
    data, arrays = case
    arr = arrays[key].copy()
    arr[0, 0, 0] = arr[1, 2, 3] = arr[3, 4, 5] = bad_value
    _write(data[key], arr)
    _raises(ValueError, data, "3 non-finite", data[key])


def test_4d_and_2d_images(case, tmp_path):
    data, _ = case
    data["ct"] = _write(tmp_path / "ct4d.nii.gz", np.zeros((*SHAPE, 2), np.float32))
    _raises(ValueError, data, "2 channels", data["ct"])
    data["ct"] = _write(tmp_path / "ct2d.nii.gz", np.zeros(SHAPE[:2], np.float32))
    _raises(ValueError, data, "3D image", data["ct"])


def test_resample_mode(tmp_path):
    pet_aff = np.diag([4.0, 4.0, 4.0, 1.0])
    pet_aff[:3, 3] = -10.0
    ct_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    ct_aff[:3, 3] = [-3.0, -5.0, -1.0]
    n_ct = 12
    grid = np.stack(np.meshgrid(*[np.arange(n_ct)] * 3, indexing="ij")).reshape(3, -1)
    world = ct_aff[:3, :3] @ grid + ct_aff[:3, 3:]

    def field(w):  # linear in world mm, so bilinear interpolation is exact inside the CT
        return 3 * w[0] - 2 * w[1] + w[2] - 200

    ct = field(world).reshape((n_ct,) * 3).astype(np.float32)
    label = (world[0] > 9).reshape((n_ct,) * 3).astype(np.uint8)
    data = {
        "case": CASE,
        "pet": _write(tmp_path / "pet.nii.gz", np.ones((8, 8, 8), np.float32), pet_aff),
        "ct": _write(tmp_path / "ct.nii.gz", ct, ct_aff),
        "label": _write(tmp_path / "label.nii.gz", label, ct_aff),
    }
    with pytest.raises(ValueError, match=re.escape("grid_mismatch='resample'")):
        LoadPETCTd()(data)
    out = LoadPETCTd(grid_mismatch="resample")(data)
    for key in ("ct", "label"):
        assert out[key].shape == (1, 8, 8, 8)
        np.testing.assert_allclose(out[key].affine.numpy(), pet_aff)
    assert out["label"].dtype == torch.uint8 and set(np.unique(out["label"].numpy())) <= {0, 1}
    # PET voxel (3, 2, 4) is world (2, -2, 6): inside the CT -> the field's value
    assert out["ct"][0, 3, 2, 4].item() == pytest.approx(field(np.array([2.0, -2.0, 6.0])), abs=1e-2)
    # PET voxel (0, 0, 0) is world (-10, -10, -10), more than a CT voxel outside the CT
    assert out["ct"][0, 0, 0, 0].item() == pytest.approx(float(ct.min()), abs=1e-3)  # padded with CT minimum
    # label: world x = 14 (PET i = 6) is > 9 in the CT label, world x = 2 (PET i = 3) is not
    assert out["label"][0, 6, 4, 4].item() == 1 and out["label"][0, 3, 4, 4].item() == 0


def test_array_level_checks():
    x = torch.zeros(1, 3, 3, 3)
    assert count_nonfinite(x) == 0 and count_nonfinite(np.arange(5)) == 0
    x[0, 0, 0, :2] = float("nan")
    x[0, 1, 1, 1] = float("-inf")
    assert count_nonfinite(x) == 3
    with pytest.raises(ValueError, match="my image: 3 non-finite"):
        check_finite(x, "my image")
    a = MetaTensor(torch.zeros(1, 3, 3, 3), affine=torch.eye(4))
    b = MetaTensor(torch.zeros(1, 3, 3, 3), affine=torch.eye(4) * 1.0005)
    assert grid_mismatch(a, b, atol=1e-3) is None
    assert grid_mismatch(a, b, atol=1e-4).startswith("affine mismatch")
    check_same_grid(a, b)
    with pytest.raises(ValueError, match="ct.*pet.*shape mismatch"):
        check_same_grid(a, MetaTensor(torch.zeros(1, 3, 3, 4)), name="ct", ref_name="pet")


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"reference_key": "spect"}, "spect"),
        ({"grid_mismatch": "warn"}, "warn"),
        ({"affine_atol": -1.0}, "-1.0"),
        ({"label_key": "ct"}, "label_key"),
    ],
)
def test_ill_arg(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        LoadPETCTd(**kwargs)
