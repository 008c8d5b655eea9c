"""Tests of M-IDoL's DINO multi-crop and evaluation resize (medfm.transforms.midol)."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image, ImageOps

from medfm.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MIDoLInputd,
    MultiCropd,
    ResizeNormalized,
    ScaleIntensity8Bitd,
)
from medfm.transforms.midol import adjust_hue, adjust_saturation, dino_crop_box, grey, solarize

# every random step off: only the crop (full image, same size), the normalisation and what a test turns on
PLAIN = {
    "global_size": 16,
    "num_global": 1,
    "num_local": 0,
    "global_scale": (1.0, 1.0),
    "global_blur_prob": 0.0,
    "global_solarize_prob": 0.0,
    "flip_prob": 0.0,
    "jitter_prob": 0.0,
    "grey_prob": 0.0,
}


def _img(c=3, h=16, w=16, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(0, 1, (c, h, w)).astype(np.float32))


def _denorm(x):
    return x * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


def test_shapes_keys_and_grey_input():
    t = MultiCropd("image", global_size=32, local_size=16, num_global=2, num_local=3)
    out = t({"image": MetaTensor(_img(1, 40, 50)), "modality_index": 2})
    assert sorted(out) == ["global_0", "global_1", "local_0", "local_1", "local_2", "modality_index"]
    assert all(out[f"global_{i}"].shape == (3, 32, 32) for i in range(2))
    assert all(out[f"local_{j}"].shape == (3, 16, 16) for j in range(3))
    assert all(type(v) is torch.Tensor and v.dtype == torch.float32 for k, v in out.items() if k != "modality_index")
    kept = MultiCropd("image", 32, 16, num_local=1, prefix_global="g", prefix_local="l", keep_source=True)
    assert sorted(kept({"image": _img()})) == ["g0", "g1", "image", "l0"]
    # M-IDoL's reference defaults: 2 x 224 global + 2 x 224 local (DINO: 8 x 96 local)
    t = MultiCropd()
    assert len(t.global_views) == 2 and len(t.local_views) == 2
    out = t({"image": _img(3, 40, 30)})
    assert all(out[k].shape == (3, 224, 224) for k in ("global_0", "global_1", "local_0", "local_1"))
    assert [v.blur_prob for v in t.global_views] == [1.0, 0.1] and [v.solarize_prob for v in t.global_views] == [0, 0.2]


def test_seeded_determinism():
    t = MultiCropd("image", global_size=24, local_size=12, num_local=2)
    img = _img(3, 40, 36)
    a = t.set_random_state(7)({"image": img})
    b = t.set_random_state(7)({"image": img})
    c = t.set_random_state(8)({"image": img})
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert not torch.equal(a["local_0"], a["local_1"])  # views draw independently


def test_identity_view_and_normalisation():
    img = _img()
    out = MultiCropd("image", **PLAIN)({"image": img})["global_0"]
    torch.testing.assert_close(_denorm(out), img, atol=1e-5, rtol=0)
    const = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None].expand(3, 16, 16)
    assert MultiCropd("image", **PLAIN)({"image": const})["global_0"].abs().max() < 1e-5
    # per channel: (x - mean) / std, checked on a bigger random image
    big = _img(3, 64, 64, seed=1)
    out = MultiCropd("image", **{**PLAIN, "global_size": 64})({"image": big})["global_0"]
    for ch in range(3):
        expected = (big[ch].mean() - IMAGENET_MEAN[ch]) / IMAGENET_STD[ch]
        assert abs(float(out[ch].mean()) - float(expected)) < 1e-4
        assert abs(float(out[ch].std()) - float(big[ch].std()) / IMAGENET_STD[ch]) < 1e-4


@pytest.mark.parametrize("axis", [0, 1])
def test_flip_matches_numpy(axis):
    img = _img()
    out = MultiCropd("image", **{**PLAIN, "flip_prob": 1.0, "flip_axis": axis})({"image": img})["global_0"]
    np.testing.assert_allclose(_denorm(out).numpy(), np.flip(img.numpy(), axis=1 + axis), atol=1e-5)


def test_solarize_matches_pil():
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ref = np.asarray(ImageOps.solarize(Image.fromarray(arr), threshold=128), np.float32) / 255
    np.testing.assert_allclose(solarize(torch.from_numpy(arr / 255.0)).numpy(), ref, atol=1e-6)
    img = _img()
    out = MultiCropd("image", **{**PLAIN, "global_solarize_prob": 1.0})({"image": img})["global_0"]
    x = img.numpy()
    np.testing.assert_allclose(_denorm(out).numpy(), np.where(x >= 128 / 255, 1 - x, x), atol=1e-5)


def test_colour_ops_against_independent_formulas():
    x = _img(3, 4, 5)
    shift = 0.23
    ref = np.empty((3, 4, 5))
    for i in range(4):
        for j in range(5):
            h, s, v = colorsys.rgb_to_hsv(*x[:, i, j].tolist())
            ref[:, i, j] = colorsys.hsv_to_rgb((h + shift) % 1, s, v)
    np.testing.assert_allclose(adjust_hue(x, shift).numpy(), ref, atol=1e-5)
    np.testing.assert_allclose(adjust_hue(x, 0.0).numpy(), x.numpy(), atol=1e-5)
    luma = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    torch.testing.assert_close(grey(x)[0], luma)
    torch.testing.assert_close(adjust_saturation(x, 0.0), luma.expand(3, -1, -1))
    torch.testing.assert_close(adjust_saturation(x, 1.0), x)
    out = MultiCropd("image", **{**PLAIN, "grey_prob": 1.0})({"image": x[:, :4, :4].repeat(1, 4, 4)})["global_0"]
    d = _denorm(out)
    assert torch.allclose(d[0], d[1], atol=1e-5) and torch.allclose(d[1], d[2], atol=1e-5)


def test_jitter_and_blur_change_and_stay_in_range():
    img = _img(3, 32, 32)
    jit = MultiCropd("image", **{**PLAIN, "global_size": 32, "jitter_prob": 1.0}).set_random_state(0)
    d = _denorm(jit({"image": img})["global_0"])
    assert d.min() >= -1e-5 and d.max() <= 1 + 1e-5 and not torch.allclose(d, img, atol=1e-3)
    blur = MultiCropd("image", **{**PLAIN, "global_size": 32, "global_blur_prob": 1.0})
    d = _denorm(blur({"image": img})["global_0"])
    assert float((d[:, :, 1:] - d[:, :, :-1]).abs().mean()) < float((img[:, :, 1:] - img[:, :, :-1]).abs().mean())


def test_crop_box_scale_and_ratio():
    rng = np.random.RandomState(0)
    for _ in range(200):
        top, left, h, w = dino_crop_box(rng, 100, 80, (0.05, 0.4))
        assert 0 <= top <= 100 - h and 0 <= left <= 80 - w
        assert 0.05 * 8000 * 0.9 <= h * w <= 0.4 * 8000 * 1.1 and 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
    assert dino_crop_box(rng, 10, 100, (0.9, 1.0)) == (0, 43, 10, 13)  # too wide: centred fallback box


def test_resize_normalized():
    out = ResizeNormalized("image", size=20)({"image": _img(1, 30, 40)})["image"]
    assert out.shape == (3, 20, 20) and out.dtype == torch.float32
    assert torch.allclose(_denorm(out)[0], _denorm(out)[1]) and torch.allclose(_denorm(out)[1], _denorm(out)[2])
    img = _img(3, 20, 20)
    torch.testing.assert_close(
        _denorm(ResizeNormalized("image", size=20)({"image": img})["image"]), img, atol=1e-5, rtol=0
    )


def test_bad_input_names_the_file():
    bad = MetaTensor(_img() * 255, meta={"filename_or_obj": "/data/oct/x.png"})
    with pytest.raises(ValueError, match=r"/data/oct/x\.png.*expected \[0, 1\]"):
        MultiCropd("image", **PLAIN)({"image": bad})
    with pytest.raises(ValueError, match="channel-first 2D"):
        MultiCropd("image", **PLAIN)({"image": torch.rand(5, 8, 8)})
    nan = _img()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ResizeNormalized("image", 8)({"image": nan})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keys": ["a", "b"]}, "one image key"),
        ({"num_global": 0}, "num_global"),
        ({"global_scale": (0.5, 0.4)}, "global_scale"),
        ({"local_scale": (0.0, 0.4)}, "local_scale"),
        ({"prefix_local": "global_"}, "must differ"),
        ({"flip_axis": 2}, "flip_axis"),
        ({"hue": 0.7}, "hue"),
        ({"global_blur_prob": (1.0, 1.5)}, "global_blur_prob"),
        ({"blur_sigma": (0.0, 2.0)}, "blur_sigma"),
        ({"std": (1.0, 0.0, 1.0)}, "std"),
    ],
)
def test_ill_arg(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiCropd(**kwargs)


def _train_parser(dataset_dir):
    import os

    from monai.bundle import ConfigParser

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser = ConfigParser()
    parser.read_config(os.path.join(root, "bundles", "midol_multimodal", "configs", "train.json"))
    parser.update({"dataset_dir": str(dataset_dir), "output_dir": str(dataset_dir)})
    return parser


def test_shipped_pretraining_input_is_rows_first_over_255_and_two_local_224_crops(tmp_path):
    a = np.zeros((20, 30, 3), np.uint8)
    a[2, 25] = 200  # the brightest pixel is 200: /255 gives 0.784, min-max would give 1
    (tmp_path / "xray").mkdir()
    Image.fromarray(a).save(tmp_path / "xray" / "x.png")
    parser = _train_parser(tmp_path)
    item = {"image": str(tmp_path / "xray" / "x.png"), "modality_index": 0}
    from monai.transforms import Compose

    det = Compose(parser.get_parsed_content("train#deterministic_transforms"))(dict(item))["image"]
    assert det.shape == (3, 20, 30)
    torch.testing.assert_close(det.as_tensor(), torch.from_numpy(a.transpose(2, 0, 1) / 255.0).float())
    out = parser.get_parsed_content("train#preprocessing")(dict(item))
    assert sorted(k for k in out if k != "modality_index") == ["global_0", "global_1", "local_0", "local_1"]
    assert all(out[k].shape == (3, 224, 224) for k in ("global_0", "global_1", "local_0", "local_1"))
    assert parser.get_parsed_content("crop_keys") == ["global_0", "global_1", "local_0", "local_1"]


def test_scale_intensity_8bit_divides_by_255_and_min_max_scales_the_rest(tmp_path):
    a = np.array([[0, 50], [100, 200]], np.uint8)
    Image.fromarray(a).save(tmp_path / "g.png")
    Image.fromarray((a.astype(np.uint16) * 100).astype(np.uint16)).save(tmp_path / "g16.png")
    from monai.transforms import LoadImaged

    load = LoadImaged("image", ensure_channel_first=True)
    t = ScaleIntensity8Bitd("image")
    out = t(load({"image": str(tmp_path / "g.png")}))["image"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    torch.testing.assert_close(out[0].as_tensor(), torch.tensor(a.T / 255.0, dtype=torch.float32))
    out16 = t(load({"image": str(tmp_path / "g16.png")}))["image"]
    torch.testing.assert_close(out16[0].as_tensor(), torch.tensor(a.T / 200.0, dtype=torch.float32))
    bare = t({"image": torch.tensor([[[2.0, 4.0, 6.0]]])})["image"]  # no meta: min-max
    torch.testing.assert_close(bare, torch.tensor([[[0.0, 0.5, 1.0]]]))


def test_midol_input_is_the_five_steps_and_inverts_to_the_file_grid(tmp_path):
    from monai.data import CacheDataset
    from monai.transforms import Compose, Invertd, LoadImaged, NormalizeIntensityd, RandomizableTrait, Resized

    from medfm.transforms import RowsFirstd, ToRGBd

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 20), dtype=np.uint8)).save(tmp_path / "x.png")  # 12 rows, 20 columns
    Image.fromarray((rng.uniform(size=(12, 20)) > 0.5).astype(np.uint8)).save(tmp_path / "m.png")
    item = {"image": str(tmp_path / "x.png"), "label": str(tmp_path / "m.png")}
    load = LoadImaged(["image", "label"], ensure_channel_first=True)
    t = MIDoLInputd(["image", "label"], image_size=8, mode=["bilinear", "nearest"])
    out = t(load(dict(item)))
    ref = load(dict(item))
    for step in (RowsFirstd(["image", "label"]), ScaleIntensity8Bitd("image"), ToRGBd("image"),
                 Resized(["image", "label"], (8, 8), mode=["bilinear", "nearest"]),
                 NormalizeIntensityd("image", subtrahend=[0.485, 0.456, 0.406], divisor=[0.229, 0.224, 0.225],
                                     channel_wise=True)):  # fmt: skip
        ref = step(ref)
    assert out["image"].shape == (3, 8, 8) and out["label"].shape == (1, 8, 8)
    torch.testing.assert_close(out["image"].as_tensor(), ref["image"].as_tensor())
    assert torch.equal(out["label"].as_tensor(), ref["label"].as_tensor())
    back = t.inverse(out)  # back through the resize and the rows-first swap, to the grid MONAI loads
    assert back["image"].shape == (3, 20, 12) and back["label"].shape == load(dict(item))["label"].shape == (1, 20, 12)
    assert not back["label"].applied_operations and set(back["label"].unique().tolist()) <= {0, 1}
    # Invertd maps a prediction back through the image's steps although the mask's key is absent from it
    pred = Invertd("pred", transform=Compose([load, t]), orig_keys="image", nearest_interp=True)
    fresh = t(load(dict(item)))  # the inverse above used up the traced operations of `out`
    assert pred({**fresh, "pred": fresh["label"].clone()})["pred"].shape == (1, 20, 12)
    assert not t.allow_missing_keys  # Invertd's allow-missing-keys mode is undone
    assert not isinstance(t, RandomizableTrait)  # a CacheDataset caches past it
    cached = CacheDataset([item], transform=Compose([load, t]), cache_rate=1.0, progress=False)
    torch.testing.assert_close(cached[0]["image"].as_tensor(), ref["image"].as_tensor())
    with pytest.raises(ValueError, match="image_key"):
        MIDoLInputd("label", image_size=8)
    with pytest.raises(ValueError, match="image_size"):
        MIDoLInputd("image", image_size=0)
