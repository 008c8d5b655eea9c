"""CropCacheDataset: the same crops as PersistentDataset from the same random state, from memory-mapped arrays."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import PersistentDataset
from monai.transforms import (
    Compose,
    ConcatItemsd,
    LoadImaged,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    SelectItemsd,
    SpatialPadd,
)

from medfm.data import CropCacheDataset, transform_state_hash

SHAPE = (21, 17, 13)
ROI = (8, 6, 16)  # the last axis is padded, as the bundle's SpatialPadd does for thin volumes


def _cases(root, n: int = 3) -> list[dict]:
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 7.0]
    items = []
    for i in range(n):
        pet = rng.gamma(1.0, 1.5, SHAPE).astype(np.float32)
        pet[:, :5] = 0.0  # outside the body: not a background candidate (image_threshold 0)
        ct = rng.normal(0.0, 400.0, SHAPE).astype(np.float32)
        ct[:, :5] = -1000.0
        label = np.zeros(SHAPE, np.uint8)
        label[3 + i : 7 + i, 8:11, 4:8] = 1
        if i == 2:
            label[:] = 0  # no lesion: every centre is background
        paths = {}
        for name, arr in (("pet", pet), ("ct", ct), ("label", label)):
            paths[name] = str(root / f"c{i}_{name}.nii.gz")
            nib.save(nib.Nifti1Image(arr, affine), paths[name])
        items.append({"case": f"c{i}", **paths})
    return items


def _transform(first_random, flip: bool = True) -> Compose:
    return Compose([
        LoadImaged(["pet", "ct", "label"], ensure_channel_first=True, image_only=False),
        ScaleIntensityRanged("ct", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
        ScaleIntensityRanged("pet", a_min=0.0, a_max=8.0, b_min=0.0, b_max=1.0, clip=True),
        ConcatItemsd(["pet", "ct"], name="image", dim=0),
        SelectItemsd(["case", "image", "label"]),
        SpatialPadd(["image", "label"], spatial_size=ROI),
        first_random,
        *([RandFlipd(["image", "label"], prob=0.5, spatial_axis=0)] if flip else []),
    ])  # fmt: skip


def _pos_neg():
    return RandCropByPosNegLabeld(["image", "label"], label_key="label", spatial_size=ROI, pos=1, neg=1,
                                  num_samples=3, image_key="image", image_threshold=0)  # fmt: skip


def _as_list(x):
    return x if isinstance(x, list) else [x]


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("first_random", [_pos_neg, lambda: RandSpatialCropd(["image", "label"], ROI)])
def test_same_samples_as_persistent_dataset(first_random, flip, tmp_path):
    items = _cases(tmp_path)
    h = transform_state_hash
    old = PersistentDataset(items, _transform(first_random(), flip), str(tmp_path / "o"), hash_transform=h)
    new = CropCacheDataset(items, _transform(first_random(), flip), str(tmp_path / "n"), hash_transform=h)
    old.transform.set_random_state(7)
    new.transform.set_random_state(7)
    for epoch in range(3):
        for i in range(len(items)):
            a, b = _as_list(old[i]), _as_list(new[i])  # the second epoch reads the filled caches
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert x["case"] == y["case"]
                assert x["image"].shape == y["image"].shape
                assert torch.equal(x["label"].as_tensor().float(), y["label"].as_tensor().float()), (epoch, i)
                assert torch.allclose(x["image"].as_tensor(), y["image"].as_tensor(), atol=1 / 65535 / 2 + 1e-7)
                if not flip and epoch == 0:  # where the crop sits; PersistentDataset's reloaded cache (later epochs)
                    # and MONAI's flip rewrite the affine their own way
                    assert torch.allclose(x["image"].affine, y["image"].affine)


def test_cache_is_compact_and_invalidated_by_the_preprocessing(tmp_path):
    items = _cases(tmp_path, 1)
    ds = CropCacheDataset(items, _transform(_pos_neg()), str(tmp_path / "c"), hash_transform=transform_state_hash)
    ds[0]
    (folder,) = [f for f in os.listdir(tmp_path / "c") if not f.startswith(".")]
    sizes = {f: os.path.getsize(tmp_path / "c" / folder / f) for f in os.listdir(tmp_path / "c" / folder)}
    voxels = int(np.prod([max(s, r) for s, r in zip(SHAPE, ROI)]))
    arrays = sum(v for f, v in sizes.items() if f[0].isdigit())
    assert arrays <= voxels * (2 * 2 + 1) + 2 * 1024  # two 16-bit channels and a uint8 label, plus headers/indices
    changed = _transform(_pos_neg())
    changed.transforms[2].scaler.a_max = 1000.5  # another CT window: another cache entry, the old one untouched
    CropCacheDataset(items, changed, str(tmp_path / "c"), hash_transform=transform_state_hash)[0]
    assert len([f for f in os.listdir(tmp_path / "c") if not f.startswith(".")]) == 2


def test_a_case_mostly_outside_the_body_takes_under_a_quarter_of_persistent_datasets_bytes(tmp_path):
    """Zeros outside a body ellipse (as after the bundles' clipped scaling) compress; noise inside it does not."""
    shape = (64, 48, 40)
    rng = np.random.default_rng(3)
    x, y = np.ogrid[:64, :48]
    body = np.broadcast_to((((x - 32) / 26.0) ** 2 + ((y - 24) / 14.0) ** 2 < 1)[..., None], shape)
    label = np.zeros(shape, np.uint8)
    label[30:36, 20:26, 10:16] = 1
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    item = {"case": "c0"}
    for name, arr in (("pet", np.where(body, rng.gamma(2.0, 0.5, shape), 0.0)),
                      ("ct", np.where(body, rng.normal(0.0, 300.0, shape), -1000.0)), ("label", label)):
        item[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(arr.astype(np.uint8 if name == "label" else np.float32), affine), item[name])

    def size(folder):
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    PersistentDataset([item], _transform(_pos_neg()), str(tmp_path / "o"), hash_transform=transform_state_hash)[0]
    CropCacheDataset([item], _transform(_pos_neg()), str(tmp_path / "n"), hash_transform=transform_state_hash)[0]
    assert size(tmp_path / "n") <= 0.25 * size(tmp_path / "o"), (size(tmp_path / "n"), size(tmp_path / "o"))


def test_refuses_a_transform_that_is_not_a_compose(tmp_path):
    with pytest.raises(ValueError, match="Compose"):
        CropCacheDataset([], RandFlipd(["image"]), str(tmp_path))
