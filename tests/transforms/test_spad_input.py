"""Tests of the release's input conventions for SPAD-ViT pre-training (medfm.transforms.spad_input)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImaged
from PIL import Image

from medfm.data import build_spad_datalist
from medfm.transforms import (
    CropForegroundSpadd,
    LimitInPlaneSized,
    ReorientToDepthd,
    RowsFirstd,
    ScaleIntensitySpadd,
    spad_limit_in_plane,
)


def test_limit_rule_by_hand():
    # shorter side 600 -> 512: r = 512 / 600; 1030 * r = 878.93 -> 879; spacings 0.5 * 600 / 512, 0.5 * 1030 / 879
    shape, spacing, level = spad_limit_in_plane((2, 600, 1030), (2.2, 0.5, 0.5))
    assert shape == [2, 512, 879]
    assert spacing == pytest.approx([2.2, 0.5859375, 0.5 * 1030 / 879])
    assert level == 1  # 2.2 / 0.5859 = 3.75 (it was 2.2 / 0.5 = 4.4: level 2)
    assert spad_limit_in_plane((2, 512, 1030), (2.2, 0.5, 0.5)) == ([2, 512, 1030], [2.2, 0.5, 0.5], 2)
    shape, spacing, level = spad_limit_in_plane((1, 700, 600), (32.0, 1.0, 1.0))  # 2D: 700 * 512 / 600 = 597.3
    assert (shape, level) == ([1, 597, 512], 5)
    assert spacing == pytest.approx([32 * 600 / 512, 700 / 597, 600 / 512])  # depth: 32 x the finer side
    assert spad_limit_in_plane((3, 900, 900), (1.0, 1.0, 1.0), None) == ([3, 900, 900], [1.0, 1.0, 1.0], 0)
    with pytest.raises(ValueError, match="max_size"):
        spad_limit_in_plane((3, 9, 9), (1.0, 1.0, 1.0), 0)


def test_resize_is_anti_aliased_and_updates_the_level():
    stripes = np.zeros((1, 2, 600, 1030), np.float32)
    stripes[..., ::2] = 1.0  # one-pixel stripes along W: pure aliasing unless smoothed first
    data = {"image": MetaTensor(torch.from_numpy(stripes)), "spacing": [2.2, 0.5, 0.5], "aniso_d": 2}
    out = LimitInPlaneSized("image")(data)
    img = out["image"].numpy()
    assert img.shape == (1, 2, 512, 879)
    assert out["aniso_d"] == 1 and out["spacing"] == pytest.approx([2.2, 0.5859375, 0.5 * 1030 / 879])
    assert abs(img.mean() - 0.5) < 0.01 and img.std() < 0.1  # the stripes average out to grey
    nearest = LimitInPlaneSized("image", mode="nearest")(dict(data))["image"].numpy()
    assert nearest.std() > 0.4  # for contrast: without smoothing the stripes alias
    small = {"image": MetaTensor(torch.ones(1, 2, 40, 50)), "spacing": [2.2, 0.5, 0.5], "aniso_d": 2}
    assert LimitInPlaneSized("image")(small)["image"].shape == (1, 2, 40, 50)


def test_datalist_with_the_limit_matches_the_pipeline(tmp_path):
    (tmp_path / "images").mkdir()
    vol = np.random.default_rng(0).random((600, 650, 3), dtype=np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([0.5, 0.5, 2.2, 1.0])), str(tmp_path / "images" / "ct.nii.gz"))
    Image.fromarray(np.full((700, 600), 9, np.uint8)).save(tmp_path / "images" / "xr.png")
    items = build_spad_datalist(str(tmp_path), max_in_plane=512)
    plain = build_spad_datalist(str(tmp_path))
    pipeline = [LoadImaged("image", ensure_channel_first=True), RowsFirstd("image"), ReorientToDepthd("image"),
                LimitInPlaneSized("image")]  # as the shipped configs (2D files rows first)
    for item, before in zip(items, plain):
        out = dict(item)
        for t in pipeline:
            out = t(out)
        assert out["aniso_d"] == item["aniso_d"]
        assert out["spacing"] == pytest.approx(item["spacing"])
        assert list(out["image"].shape[1:]) == item["shape"]
        assert min(item["shape"][1:]) == 512 and min(before["shape"][1:]) > 512
    ct = next(d for d in items if d["image"].endswith(".nii.gz"))
    assert ct["aniso_d"] == 1 and next(d for d in plain if d["image"].endswith(".nii.gz"))["aniso_d"] == 2


def test_foreground_crop_is_the_box_above_the_lower_percentile():
    """CT-like: padding at -1024 around a body block; the release crops to the voxels above the 0.5 percentile
    of the voxels above the minimum, i.e. above 0 after ScaleIntensitySpadd."""
    rng = np.random.default_rng(0)
    x = np.full((1, 6, 20, 24), -1024.0, np.float32)
    x[:, 1:5, 3:15, 6:20] = rng.uniform(-100, 300, (1, 4, 12, 14))
    data = ScaleIntensitySpadd("image")({"image": MetaTensor(torch.from_numpy(x)), "intensity": "percentile"})
    out = CropForegroundSpadd("image")(data)["image"]
    body = x[x > x.min()]
    mask = x[0] > np.percentile(body, 0.5)
    idx = [np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != k)))[0] for k in range(3)]
    box = tuple(slice(i[0], i[-1] + 1) for i in idx)
    assert tuple(out.shape[1:]) == tuple(s.stop - s.start for s in box)
    np.testing.assert_array_equal(out.numpy(), data["image"].numpy()[(slice(None), *box)])
    assert out.affine[1, 3] == pytest.approx(float(box[1].start))  # the affine follows the crop


def test_foreground_crop_needs_every_channel_and_keeps_an_empty_image():
    img = torch.zeros(3, 1, 8, 8)
    img[:, 0, 2:6, 1:7] = 0.5
    img[1, 0, 2:6, 5:7] = 0.0  # green off at the right: not foreground
    out = CropForegroundSpadd("image")({"image": img})["image"]
    assert tuple(out.shape) == (3, 1, 4, 4)
    empty = torch.zeros(1, 2, 5, 5)
    assert CropForegroundSpadd("image")({"image": empty})["image"].shape == empty.shape
