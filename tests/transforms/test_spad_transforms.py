"""Tests of SPAD-ViT's transforms (medfm.transforms.spad), checked against independent computations."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged
from PIL import Image

from medfm.transforms import (
    ReorientToDepthd,
    ScaleIntensitySpadd,
    SpadRandCropd,
    ToRGBd,
    spad_layout,
    spad_roi_size,
    through_plane_axis,
)


def _rotation(seed: int) -> np.ndarray:
    """A random proper rotation (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _volume(shape, spacing, seed=0, channels=1) -> MetaTensor:
    """MetaTensor ``(C, *shape)`` of unique values (the flat index) on an oblique grid of the given spacing."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation(seed) @ np.diag(spacing)
    affine[:3, 3] = (12.5, -40.0, 7.25)
    data = np.arange(channels * math.prod(shape), dtype=np.float32).reshape(channels, *shape)
    return MetaTensor(torch.from_numpy(data), affine=torch.from_numpy(affine), meta={"filename_or_obj": "vol.nii.gz"})


def _world(affine: torch.Tensor, index: np.ndarray) -> np.ndarray:
    """World coordinates of voxel indices ``(N, k)``, ``k <= 3``, missing trailing indices 0."""
    a = np.asarray(affine, dtype=np.float64)
    index = np.concatenate([index, np.zeros((len(index), len(a) - 1 - index.shape[1]))], 1)  # 2D in a 4x4 affine
    return index @ a[:-1, :-1].T + a[:-1, -1]


@pytest.mark.parametrize(
    ("spacing", "axis"),
    [((0.7, 0.7, 5.0), 2), ((3.0, 0.8, 0.8), 0), ((0.9, 4.0, 0.9), 1), ((1.0, 1.0, 1.0), 2), ((0.5, 1.0, 1.5), 0),
     ((1.0, 2.0, 4.0), 2), ((0.8, 0.8, 0.3), 2), ((0.7000001, 0.6999999, 2.0), 2)],
)  # fmt: skip
def test_through_plane_axis(spacing, axis):
    assert through_plane_axis(spacing) == axis


def test_through_plane_axis_ill_arg():
    with pytest.raises(ValueError, match="positive"):
        through_plane_axis((1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="three"):
        through_plane_axis((1.0, 1.0))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_reorient_puts_the_anisotropic_axis_first_and_keeps_world_coordinates(axis):
    shape = [5, 6, 7]
    spacing = [0.8, 0.8, 0.8]
    spacing[axis] = 3.5
    img = _volume(shape, spacing, seed=axis, channels=2)
    label = img[:1].clone()
    out = ReorientToDepthd(["image", "label"])({"image": img, "label": label})
    new = out["image"]
    # the largest-spacing axis is first, the other two keep their order
    rest = [a for a in range(3) if a != axis]
    assert tuple(new.shape) == (2, shape[axis], shape[rest[0]], shape[rest[1]])
    assert out["aniso_d"] == math.floor(math.log2(3.5 / 0.8))
    assert out["spacing"] == pytest.approx([3.5, 0.8, 0.8])
    # every voxel: its value is its old flat index, so the old voxel is known; both must map to one world point
    idx_new = np.stack(np.meshgrid(*[np.arange(n) for n in new.shape[1:]], indexing="ij"), -1).reshape(-1, 3)
    values = new[0].numpy().reshape(-1).astype(np.int64)
    idx_old = np.stack(np.unravel_index(values, shape), -1)
    np.testing.assert_allclose(_world(new.affine, idx_new), _world(img.affine, idx_old), atol=1e-9)
    assert torch.equal(out["label"].as_tensor(), new[:1].as_tensor())
    assert torch.equal(out["label"].affine, new.affine)
    # spacing written into the data equals the column norms of the new affine
    np.testing.assert_allclose(np.linalg.norm(new.affine[:3, :3].numpy(), axis=0), out["spacing"], rtol=1e-6)


@pytest.mark.parametrize("rank", [3, 2])
def test_reorient_2d_adds_depth_axis(rank):
    h, w = 6, 9
    data = torch.arange(3 * h * w, dtype=torch.float32).reshape(3, h, w)
    affine = np.eye(rank + 1)
    affine[:2, :2] = [[0.0, 0.5], [0.7, 0.0]]
    affine[:2, rank] = (3.0, -2.0)
    img = MetaTensor(data, affine=torch.from_numpy(affine), meta={"filename_or_obj": "x.png"})
    tr = ReorientToDepthd("image")
    out = tr({"image": img})
    assert tuple(out["image"].shape) == (3, 1, h, w)
    assert out["aniso_d"] == 5
    assert out["spacing"] == pytest.approx([32 * 0.5, 0.7, 0.5])
    assert tuple(out["image"].affine.shape) == (4, 4)
    idx = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    world_2d = _world(torch.from_numpy(affine), idx)[:, :2]
    world_new = _world(out["image"].affine, np.concatenate([np.zeros((len(idx), 1)), idx], 1))
    np.testing.assert_allclose(world_new[:, :2], world_2d, atol=1e-12)
    back = tr.inverse(out)["image"]
    assert torch.equal(back.as_tensor(), data)
    assert torch.equal(back.affine, img.affine)


def test_spad_layout_singleton_axis_is_2d():
    layout = spad_layout((30, 20, 1), (0.7, 0.5, 1.0))
    assert layout.axes == (2, 0, 1) and layout.dim == 2 and layout.aniso_d == 5
    assert layout.spacing == pytest.approx((16.0, 0.7, 0.5))
    layout = spad_layout((1, 30, 20), (5.0, 0.7, 0.7))
    assert layout.axes == (0, 1, 2) and layout.dim == 2


def _write_nifti(path, array, spacing) -> str:
    affine = np.diag([*spacing, 1.0])
    affine[:3, :3] = _rotation(3) @ np.diag(spacing)
    affine[:3, 3] = (-10.0, 5.0, 2.0)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["sagittal", "coronal", "axial", "png"])
def test_invertd_round_trip(tmp_path, kind):
    rng = np.random.default_rng(1)
    if kind == "png":
        arr = rng.integers(0, 256, (9, 13), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "img.png")
        Image.fromarray((arr > 128).astype(np.uint8)).save(tmp_path / "lab.png")
        data = {"image": str(tmp_path / "img.png"), "label": str(tmp_path / "lab.png")}
    else:
        spacing = {"sagittal": (4.0, 0.9, 0.9), "coronal": (0.9, 4.0, 0.9), "axial": (0.9, 0.9, 4.0)}[kind]
        arr = rng.standard_normal((5, 6, 7)).astype(np.float32)
        data = {
            "image": _write_nifti(tmp_path / "img.nii.gz", arr, spacing),
            "label": _write_nifti(tmp_path / "lab.nii.gz", (arr > 0).astype(np.uint8), spacing),
        }
    keys = ["image", "label"]
    load = Compose([LoadImaged(keys), EnsureChannelFirstd(keys)])
    pre = Compose([LoadImaged(keys), EnsureChannelFirstd(keys), ReorientToDepthd(keys)])
    raw, out = load(data), pre(data)
    assert out["image"].shape[1] == (1 if kind == "png" else 5 if kind == "sagittal" else 6 if kind == "coronal" else 7)
    out["pred"] = out["image"] * 2.0 + 1.0
    inv = Invertd(["pred", "label"], pre, orig_keys=["image", "label"], nearest_interp=False)(out)
    assert inv["pred"].shape == raw["image"].shape
    assert torch.equal(inv["pred"].as_tensor(), raw["image"].as_tensor() * 2.0 + 1.0)
    assert torch.equal(inv["pred"].affine, raw["image"].affine)
    assert torch.equal(inv["label"].as_tensor(), raw["label"].as_tensor())
    assert torch.equal(inv["label"].affine, raw["label"].affine)


def test_reorient_errors():
    img = _volume((4, 5, 6), (1.0, 1.0, 3.0))
    bad = MetaTensor(torch.zeros(1, 4, 5, 7), meta={"filename_or_obj": "lab.nii.gz"})
    with pytest.raises(ValueError, match=r"vol\.nii\.gz.*'label'.*lab\.nii\.gz"):
        ReorientToDepthd(["image", "label"])({"image": img, "label": bad})
    with pytest.raises(TypeError, match="MetaTensor"):
        ReorientToDepthd("image")({"image": np.zeros((1, 4, 5, 6))})
    with pytest.raises(ValueError, match="vol.nii.gz"):
        ReorientToDepthd("image")(
            {"image": MetaTensor(torch.zeros(1, 2, 3, 4, 5), meta={"filename_or_obj": "vol.nii.gz"})}
        )


def test_scale_intensity_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 4, 20, 20)) * 100 + 40).astype(np.float32)
    out = ScaleIntensitySpadd("image")({"image": MetaTensor(torch.from_numpy(x)), "intensity": "percentile"})
    lo, hi = np.percentile(x[x > x.min()], [0.5, 99.5])
    expected = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    np.testing.assert_allclose(out["image"].numpy(), expected, atol=1e-5)
    assert out["image"].dtype == torch.float32
    # no intensity key: percentile too; above_min=False: over all voxels
    out2 = ScaleIntensitySpadd("image", lower=10, upper=90, above_min=False)({"image": torch.from_numpy(x)})
    lo, hi = np.percentile(x, [10, 90])
    np.testing.assert_allclose(out2["image"].numpy(), np.clip((x - lo) / (hi - lo), 0, 1), atol=1e-5)


def test_scale_intensity_percentiles_skip_the_background_at_the_minimum():
    """A CT-like volume: 60% padding at -1024, tissue values 0..999 (each once). The reference takes the
    percentiles over the voxels above the minimum, i.e. over the 1000 tissue values alone."""
    tissue = np.random.default_rng(1).permutation(1000).astype(np.float32)
    x = np.concatenate([np.full(1500, -1024.0, np.float32), tissue]).reshape(1, 10, 10, 25)
    out = ScaleIntensitySpadd("image")({"image": torch.from_numpy(x), "intensity": "percentile"})["image"].numpy()
    # hand computation (linear interpolation over the sorted values 0..999): p0.5 at rank 0.005 * 999 = 4.995,
    # p99.5 at rank 0.995 * 999 = 994.005
    lo, hi = 4.995, 994.005
    np.testing.assert_allclose(out, np.clip((x - lo) / (hi - lo), 0, 1), atol=1e-5)
    assert out.min() == 0.0 and out[x == 500.0] == pytest.approx((500 - lo) / (hi - lo))
    # over all voxels the lower bound would sit in the padding and tissue 0 would map to ~0.5
    allv = ScaleIntensitySpadd("image", above_min=False)({"image": torch.from_numpy(x)})["image"].numpy()
    assert allv[x == 0.0].item() == pytest.approx(1024 / (1024 + np.percentile(x, 99.5)), abs=1e-4)
    # channel-wise: each channel above its own minimum
    two = np.stack([x[0], 2 * x[0] + 7])
    cw = ScaleIntensitySpadd("image", channel_wise=True)({"image": torch.from_numpy(two)})["image"].numpy()
    np.testing.assert_allclose(cw[1], out[0], atol=1e-5)
    # a constant image has no voxel above its minimum: zeros
    const = ScaleIntensitySpadd("image")({"image": torch.full((1, 2, 3, 4), 7.0)})["image"]
    assert float(const.abs().sum()) == 0.0


def test_scale_intensity_uint8_divides_by_255():
    x = np.arange(256, dtype=np.float32).reshape(1, 1, 16, 16)
    out = ScaleIntensitySpadd("image")({"image": MetaTensor(torch.from_numpy(x)), "intensity": "uint8"})
    np.testing.assert_allclose(out["image"].numpy(), x / 255.0, rtol=1e-6)
    assert isinstance(out["image"], MetaTensor)


def test_scale_intensity_errors():
    x = torch.ones(1, 1, 4, 4)
    x[0, 0, 1, 1] = float("nan")
    x[0, 0, 2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"scan\.nii\.gz.*2 non-finite"):
        ScaleIntensitySpadd("image")({"image": MetaTensor(x, meta={"filename_or_obj": "scan.nii.gz"})})
    with pytest.raises(ValueError, match="uint16"):
        ScaleIntensitySpadd("image")({"image": torch.ones(1, 2, 2), "intensity": "uint16"})
    with pytest.raises(ValueError, match="lower"):
        ScaleIntensitySpadd("image", lower=60, upper=40)


@pytest.mark.parametrize("aniso_d", range(6))
def test_spad_roi_size(aniso_d):
    # depth = tokens x depth patch (16 >> level); past the patch (2**level > 16) a single slice, like 2D
    depth = [5 * 16, 5 * 8, 5 * 4, 5 * 2, 5 * 1, 1][aniso_d]
    assert spad_roi_size((5, 10, 12), aniso_d) == (depth, 160, 192)
    assert spad_roi_size((5, 10, 12), aniso_d, is_2d=True) == (1, 160, 192)
    assert spad_roi_size((2, 3, 3), aniso_d, patch_size=8) == ([16, 8, 4, 2, 1, 1][aniso_d], 24, 24)


def test_spad_roi_size_ill_arg():
    for tokens, aniso in [((0, 1, 1), 0), ((1, 1), 0), ((1, 1, 1), 6), ((1, 1, 1), -1)]:
        with pytest.raises(ValueError):
            spad_roi_size(tokens, aniso)
    with pytest.raises(ValueError):
        SpadRandCropd("image", tokens=(1, 0, 1))


def _find_offset(crop: np.ndarray, shape) -> tuple[int, ...]:
    """Start of a crop of an ``arange`` volume, from the value of its first voxel."""
    return tuple(int(i) for i in np.unravel_index(int(crop.flat[0]), shape))


@pytest.mark.parametrize(
    ("aniso_d", "shape"), [(0, (40, 40, 40)), (1, (20, 40, 36)), (2, (12, 33, 40)), (5, (3, 40, 40))]
)
def test_rand_crop_matches_slicing_and_is_shared(aniso_d, shape):
    tokens = (2, 2, 2)
    roi = (1 if aniso_d == 5 else 2 * (16 >> aniso_d), 32, 32)
    img = _volume(shape, (1.0, 1.0, 1.0))
    label = img.clone() * 2
    tr = SpadRandCropd(["image", "label"], tokens=tokens).set_random_state(3)
    out = tr({"image": img, "label": label, "aniso_d": aniso_d})
    assert tuple(out["image"].shape[1:]) == roi
    start = _find_offset(out["image"][0].numpy(), shape)
    expected = img[0].numpy()[tuple(slice(s, s + r) for s, r in zip(start, roi))]
    np.testing.assert_array_equal(out["image"][0].numpy(), expected)
    np.testing.assert_array_equal(out["label"].numpy(), out["image"].numpy() * 2)
    # crop origin in world space is the original voxel at ``start``
    np.testing.assert_allclose(out["image"].affine[:3, 3].numpy(), _world(img.affine, np.array([start]))[0])
    back = tr.inverse(out)
    assert back["image"].shape == img.shape
    np.testing.assert_allclose(back["image"].affine.numpy(), img.affine.numpy(), atol=1e-9)
    np.testing.assert_array_equal(back["image"].numpy()[(0, *(slice(s, s + r) for s, r in zip(start, roi)))], expected)


def test_rand_crop_2d_pads_and_seeding():
    img = MetaTensor(torch.arange(1, 1 + 20 * 24, dtype=torch.float32).reshape(1, 1, 20, 24))
    tr = SpadRandCropd("image", tokens=(3, 2, 2), patch_size=16)
    out = tr({"image": img, "aniso_d": 5})["image"]
    assert tuple(out.shape) == (1, 1, 32, 32)
    # padded with zeros: the whole image is inside, symmetric padding (6 + 6 rows, 4 + 4 columns)
    assert float(out.sum()) == float(img.sum())
    np.testing.assert_array_equal(out[0, 0, 6:26, 4:28].numpy(), img[0, 0].numpy())
    assert int((out == 0).sum()) == 32 * 32 - 20 * 24
    big = _volume((8, 64, 64), (1.0, 1.0, 4.0))
    starts = []
    for seed in (0, 0, 1):
        crop = SpadRandCropd("image", tokens=(1, 1, 1)).set_random_state(seed)({"image": big, "aniso_d": 2})["image"]
        starts.append(_find_offset(crop[0].numpy(), (8, 64, 64)))
    assert starts[0] == starts[1] != starts[2]
    centre = SpadRandCropd("image", tokens=(1, 1, 1), random_center=False)({"image": big, "aniso_d": 2})["image"]
    assert _find_offset(centre[0].numpy(), (8, 64, 64)) == (2, 24, 24)


def test_rand_crop_errors():
    img = MetaTensor(torch.zeros(1, 4, 8, 8), meta={"filename_or_obj": "v.nii.gz"})
    with pytest.raises(ValueError, match=r"v\.nii\.gz.*aniso_d"):
        SpadRandCropd("image")({"image": img})
    with pytest.raises(ValueError, match="ReorientToDepthd"):
        SpadRandCropd("image")({"image": torch.zeros(1, 8, 8), "aniso_d": 5})
    with pytest.raises(ValueError, match="spatial shape"):
        SpadRandCropd(["image", "label"])({"image": img, "label": torch.zeros(1, 4, 8, 9), "aniso_d": 2})


def test_to_rgb_keeps_or_refuses_two_and_four_channels(tmp_path):
    """Grey + alpha and RGBA are read as such only for 8-bit natural images; a 2-channel scan is refused by name."""
    rng = np.random.default_rng(0)
    la = rng.integers(0, 256, (6, 5, 2), dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(tmp_path / "grey_alpha.png")
    mr = rng.standard_normal((6, 5, 4, 2)).astype(np.float32)  # in- and opposed-phase MR in one file
    nib.save(nib.Nifti1Image(mr, np.diag([1.0, 1.0, 3.0, 1.0])), str(tmp_path / "dixon.nii.gz"))
    def load(d):
        return ToRGBd("image")(LoadImaged("image", ensure_channel_first=True)(d))

    out = load({"image": str(tmp_path / "grey_alpha.png"), "intensity": "uint8"})["image"]
    assert out.shape[0] == 3
    for ch in range(3):  # the grey channel, replicated (compared as values: independent of the axis order)
        np.testing.assert_array_equal(out[ch].numpy(), out[0].numpy())
    np.testing.assert_array_equal(np.sort(out[0].numpy().ravel()), np.sort(la[..., 0].ravel()))
    with pytest.raises(ValueError, match=r"dixon\.nii\.gz.*2 channels"):
        load({"image": str(tmp_path / "dixon.nii.gz"), "intensity": "percentile"})
    with pytest.raises(ValueError, match=r"dixon\.nii\.gz.*2 channels"):
        load({"image": str(tmp_path / "dixon.nii.gz")})
    four = MetaTensor(torch.ones(4, 2, 3, 3), meta={"filename_or_obj": "seq4.nii.gz"})
    with pytest.raises(ValueError, match=r"seq4\.nii\.gz.*4 channels"):
        ToRGBd("image")({"image": four})
    assert ToRGBd("image")({"image": four, "intensity": "uint8"})["image"].shape == (3, 2, 3, 3)
    one = MetaTensor(torch.arange(8.0).reshape(1, 2, 2, 2))
    np.testing.assert_array_equal(ToRGBd("image")({"image": one})["image"].numpy(), one.repeat(3, 1, 1, 1).numpy())
