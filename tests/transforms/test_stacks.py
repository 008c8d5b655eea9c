"""Tests of the FratMAE stack crops (medfm.transforms.stacks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medfm.transforms import RandStackCrop, RandStackCropd, StackCrop, stack_crop_starts


def _arange(shape) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


def _reference_crop(vol: np.ndarray, start, roi, axis: int, k: int) -> np.ndarray:
    """Independent reference: zero-pad generously, then index with explicit index lists."""
    m = 64
    padded = np.pad(vol, [(0, 0)] + [(m, m)] * (vol.ndim - 1))
    idx = []
    for a, (s, r) in enumerate(zip(start, roi)):
        step = k if a == axis else 1
        idx.append(np.array([m + s + step * i for i in range(r)]))
    return padded[np.ix_(np.arange(vol.shape[0]), *idx)]


def _rotation_affine() -> torch.Tensor:
    c, s = np.cos(0.3), np.sin(0.3)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 1.5, 2.5])
    aff[:3, 3] = [-12.0, 7.5, 30.0]
    return torch.as_tensor(aff, dtype=torch.float64)


@pytest.mark.parametrize("stack_axis", [0, 1, 2])
@pytest.mark.parametrize("factor", [1, 2, 3])
@pytest.mark.parametrize("kind", ["numpy", "tensor", "meta"])
def test_crop_matches_numpy_slicing(stack_axis, factor, kind):
    vol = _arange((2, 13, 14, 15))
    roi, start = [4, 5, 3], [2, 1, 3]
    img = {"numpy": vol, "tensor": torch.as_tensor(vol), "meta": MetaTensor(torch.as_tensor(vol))}[kind]
    out = StackCrop(roi, stack_axis, factor)(img, start=start)
    assert type(out) is type(img)
    got = np.asarray(out.as_tensor() if kind == "meta" else out)
    # independent: plain numpy basic slicing
    sl = [slice(None)] + [slice(s, s + r) for s, r in zip(start, roi)]
    sl[1 + stack_axis] = slice(start[stack_axis], start[stack_axis] + factor * roi[stack_axis], factor)
    np.testing.assert_array_equal(got, vol[tuple(sl)])
    assert got.shape == (2, *roi)


def test_kept_slices_are_every_kth():
    shape = (1, 6, 20, 7)
    vol = _arange(shape)
    out = StackCrop((6, 5, 7), stack_axis=1, factor=3)(torch.as_tensor(vol), start=(0, 4, 0))
    y_index = (out.numpy().astype(np.int64) // shape[3]) % shape[2]  # decode the Y index of each voxel
    for j, y in enumerate(range(4, 4 + 15, 3)):
        assert np.all(y_index[:, :, j, :] == y)


def test_centred_start():
    # size >= window: size // 2 - window // 2 (MONAI CenterSpatialCrop); size < window: symmetric pad
    assert stack_crop_starts((10, 11, 4), (3, 4, 7)) == (5 - 1, 5 - 2, -1)
    vol = _arange((1, 10, 12, 9))
    out = StackCrop((4, 3, 9), stack_axis=1, factor=2)(torch.as_tensor(vol))  # Y window 6 -> start 3
    np.testing.assert_array_equal(out.numpy(), vol[:, 3:7, 3:9:2, :])


def test_padding_with_zeros_symmetric():
    vol = _arange((1, 4, 5, 6)) + 1.0  # strictly positive so padded zeros are recognisable
    cropper = RandStackCrop((6, 3, 6), stack_axis=1, factor=2, random_center=True).set_random_state(0)
    out = cropper(torch.as_tensor(vol)).numpy()
    # X: 4 -> 6 pads (1, 1); Y: window 6 on 5 pads (0, 1); Z fits exactly
    expected = np.pad(vol, ((0, 0), (1, 1), (0, 1), (0, 0)))[:, :, 0:6:2, :]
    np.testing.assert_array_equal(out, expected)
    assert cropper.start == (-1, 0, 0)
    assert (out == 0).sum() == out.size - 4 * 3 * 6


@pytest.mark.parametrize("start", [(-3, -2, 4), (5, 6, -1), (-20, 0, 0), (2, 9, 8)])
def test_arbitrary_start_with_padding(start):
    vol = _arange((2, 7, 8, 9)) + 1.0
    roi, axis, k = (5, 4, 3), 1, 3
    out = StackCrop(roi, axis, k)(torch.as_tensor(vol), start=start)
    np.testing.assert_array_equal(out.numpy(), _reference_crop(vol, start, roi, axis, k))


@pytest.mark.parametrize("start", [(3, 2, 5), (-2, -3, 1)])
def test_affine_maps_each_voxel_to_same_world_point(start):
    vol = _arange((1, 9, 20, 11))
    aff = _rotation_affine()
    img = MetaTensor(torch.as_tensor(vol), affine=aff)
    roi, axis, k = (6, 4, 5), 1, 3
    out = StackCrop(roi, axis, k)(img, start=start)
    assert isinstance(out, MetaTensor)
    new_aff = out.affine.numpy()
    i, j, m = np.meshgrid(*[np.arange(r) for r in roi], indexing="ij")
    out_vox = np.stack([i, j, m, np.ones_like(i)]).reshape(4, -1)
    in_vox = out_vox.copy()
    for a in range(3):
        in_vox[a] = start[a] + (k if a == axis else 1) * out_vox[a]
    np.testing.assert_allclose(new_aff @ out_vox, aff.numpy() @ in_vox, atol=1e-9)
    # and the voxel values agree where the input voxel exists
    inside = np.all((in_vox[:3] >= 0) & (in_vox[:3] < np.array(vol.shape[1:])[:, None]), axis=0)
    src = vol[0][tuple(in_vox[:3, inside])]
    np.testing.assert_array_equal(out.as_tensor().numpy()[0][tuple(out_vox[:3, inside])], src)
    assert np.allclose(img.affine.numpy(), aff.numpy())  # the input is untouched


def test_output_is_a_copy():
    img = MetaTensor(torch.zeros(1, 8, 8, 8))
    out = StackCrop((8, 8, 8), stack_axis=2, factor=1)(img, start=(0, 0, 0))
    out += 5
    assert float(img.abs().max()) == 0.0
    assert out.is_contiguous()


def test_dict_same_crop_for_all_keys():
    pet = torch.as_tensor(_arange((1, 12, 16, 10)))
    aff = _rotation_affine()
    data = {
        "pet": MetaTensor(pet, affine=aff),
        "ct": MetaTensor(pet + 1, affine=aff),
        "label": MetaTensor((pet % 7 == 0).to(torch.uint8), affine=aff),
        "case": "demo_000",
    }
    t = RandStackCropd(["ct", "pet", "label"], roi_size=(6, 4, 5), stack_axis=1, factor=2).set_random_state(3)
    for _ in range(10):
        out = t(data)
        assert out["ct"].shape == out["pet"].shape == out["label"].shape == (1, 6, 4, 5)
        torch.testing.assert_close(out["ct"].as_tensor(), out["pet"].as_tensor() + 1)
        assert torch.equal(out["label"].as_tensor(), (out["pet"].as_tensor() % 7 == 0).to(torch.uint8))
        assert out["label"].dtype == torch.uint8
        torch.testing.assert_close(out["ct"].affine, out["pet"].affine)
        ref = _reference_crop(pet.numpy(), t.cropper.start, (6, 4, 5), 1, 2)
        np.testing.assert_array_equal(out["pet"].as_tensor().numpy(), ref)
        assert out["case"] == "demo_000"


def test_random_starts_cover_range_and_seed():
    shape = (1, 10, 20, 9)
    starts = set()
    t = RandStackCropd("img", roi_size=(4, 4, 9), stack_axis=1, factor=2).set_random_state(0)
    for _ in range(200):
        t({"img": torch.zeros(shape)})
        starts.add(t.cropper.start)
    xs, ys, zs = zip(*starts)
    assert set(xs) == set(range(0, 10 - 4 + 1))  # all X starts occur
    assert set(ys) == set(range(0, 20 - 8 + 1))  # Y window is 2 * 4
    assert set(zs) == {0}

    def draws(seed):
        tt = RandStackCropd("img", roi_size=(4, 4, 9), stack_axis=1, factor=2).set_random_state(seed)
        out = []
        for _ in range(5):
            tt({"img": torch.zeros(shape)})
            out.append(tt.cropper.start)
        return out

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_not_random_center_is_centred():
    vol = _arange((1, 10, 20, 9))
    t = RandStackCropd("img", roi_size=(4, 4, 9), stack_axis=1, factor=2, random_center=False)
    out = t({"img": MetaTensor(torch.as_tensor(vol))})["img"]
    np.testing.assert_array_equal(out.as_tensor().numpy(), vol[:, 3:7, 6:14:2, :])


def test_paper_coronal_and_axial_shapes():
    img = MetaTensor(torch.rand(1, 160, 160, 192))
    cor = RandStackCropd("pet", (160, 32, 192), stack_axis=1, factor=2).set_random_state(0)({"pet": img})["pet"]
    ax = RandStackCropd("pet", (160, 160, 32), stack_axis=2, factor=1).set_random_state(0)({"pet": img})["pet"]
    assert cor.shape == (1, 160, 32, 192) and ax.shape == (1, 160, 160, 32)
    assert np.allclose(np.diag(cor.affine.numpy())[:3], [1.0, 2.0, 1.0])  # Y spacing doubled


def test_dict_shape_mismatch_and_missing_keys():
    t = RandStackCropd(["ct", "pet"], (2, 2, 2), stack_axis=0)
    with pytest.raises(ValueError, match="one spatial shape"):
        t({"ct": torch.zeros(1, 4, 4, 4), "pet": torch.zeros(1, 4, 4, 5)})
    with pytest.raises(KeyError):
        t({"ct": torch.zeros(1, 4, 4, 4)})
    t2 = RandStackCropd(["ct", "pet"], (2, 2, 2), stack_axis=0, allow_missing_keys=True)
    assert t2({"ct": torch.zeros(1, 4, 4, 4)})["ct"].shape == (1, 2, 2, 2)


def test_wrong_image_rank():
    with pytest.raises(ValueError, match="spatial dims"):
        StackCrop((2, 2, 2), 0)(torch.zeros(4, 4, 4))


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"roi_size": (0, 4, 4), "stack_axis": 0}, "roi_size"),
        ({"roi_size": (4, -1, 4), "stack_axis": 0}, "roi_size"),
        ({"roi_size": 4, "stack_axis": 0}, "roi_size"),
        ({"roi_size": (4.0, 4, 4), "stack_axis": 0}, "roi_size"),
        ({"roi_size": (), "stack_axis": 0}, "roi_size"),
        ({"roi_size": (4, 4, 4), "stack_axis": 3}, "stack_axis"),
        ({"roi_size": (4, 4, 4), "stack_axis": -1}, "stack_axis"),
        ({"roi_size": (4, 4, 4), "stack_axis": 1.0}, "stack_axis"),
        ({"roi_size": (4, 4, 4), "stack_axis": 1, "factor": 0}, "factor"),
        ({"roi_size": (4, 4, 4), "stack_axis": 1, "factor": 1.5}, "factor"),
        ({"roi_size": (4, 4, 4), "stack_axis": 1, "factor": True}, "factor"),
    ],
)
def test_ill_arg(kwargs, bad):
    for cls in (StackCrop, RandStackCrop):
        with pytest.raises(ValueError, match=bad):
            cls(**kwargs)
    with pytest.raises(ValueError, match=bad):
        RandStackCropd(keys="img", **kwargs)
