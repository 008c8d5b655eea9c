"""Tests of SPAD-ViT's scale augmentation (medfm.transforms.spad_augment) and the sampler that draws it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor

from medfm.data import AnisoBatchSampler, SeededSample, SpadDrawDataset
from medfm.transforms import SpadRandAffineCropd, SpadRandCropd, SpadScaleAugment


def _level(sz: float, sy: float, sx: float) -> int:
    """floor(log2(clip(sz / min(sy, sx), 1, 32))) by repeated halving (independent of the library)."""
    ratio, level = min(max(sz / min(sy, sx), 1.0), 32.0), 0
    while ratio >= 2.0 - 1e-12 and level < 5:
        ratio, level = ratio / 2.0, level + 1
    return level


# (depth-first spacing, shape): isotropic, slightly anisotropic, thick slices, top level, a 2D image, a small image
CASES = [
    ((1.0, 1.0, 1.0), (64, 256, 300)),
    ((1.4, 1.0, 1.0), (40, 200, 200)),
    ((5.0, 0.7, 0.7), (30, 400, 380)),
    ((20.0, 0.5, 0.5), (12, 512, 512)),
    ((32.0, 1.0, 1.0), (1, 300, 240)),
    ((2.0, 1.0, 1.0), (20, 100, 90)),
]


@pytest.mark.parametrize(("spacing", "shape"), CASES)
def test_draw_level_follows_the_scaled_spacing(spacing, shape):
    aug = SpadScaleAugment(tokens=(5, 10, 10), patch_size=16)  # the shipped defaults
    rng = np.random.default_rng(0)
    draws = [aug.draw(rng, spacing, shape) for _ in range(3000)]
    near_iso = spacing[0] <= 1.5 * min(spacing[1:])
    hi = min(2.0, min(shape[1:]) / 160)
    for d in draws:
        s_z, s_h, s_w = d["scale"]
        assert s_h == s_w
        assert s_h == 1.0 or min(0.75, hi) <= s_h <= max(0.75, hi)
        assert s_z == 1.0 or (near_iso and 0.8 <= s_z <= 1.25)
        if shape[0] == 1:  # 2D: always the top level, one slice
            assert d["aniso_d"] == 5 and d["roi"] == [1, 160, 160]
            continue
        level = _level(spacing[0] * s_z, spacing[1] * s_h, spacing[2] * s_w)
        assert d["aniso_d"] == level
        assert d["roi"] == [1 if level == 5 else 5 * (16 >> level), 160, 160]
    # probabilities as the reference: in-plane 0.5, through-plane 0.3 (near-isotropic only)
    p_xy = np.mean([d["scale"][1] != 1.0 for d in draws])
    p_z = np.mean([d["scale"][0] != 1.0 for d in draws])
    assert abs(p_xy - 0.5) < 0.04
    assert abs(p_z - (0.3 if near_iso and shape[0] > 1 else 0.0)) < 0.04


def test_a_volume_changes_level_from_draw_to_draw():
    aug = SpadScaleAugment()
    rng = np.random.default_rng(1)
    levels = {aug.draw(rng, (2.0, 1.0, 1.0), (40, 400, 400))["aniso_d"] for _ in range(200)}
    assert levels == {0, 1}  # 2 / 2.0 = 1 (level 0) up to 2 / 0.75 (level 1)


def test_draw_ill_args():
    for kw in ({"scale_xy": (0.0, 1.0)}, {"scale_z": (1.5, 1.2)}, {"scale_xy_prob": 1.5}, {"isotropic_th": 0.5}):
        with pytest.raises(ValueError):
            SpadScaleAugment(**kw)


def _ramp(shape, coef, spacing, name="ramp.nii.gz") -> dict:
    """A sample whose intensity is ``coef . (d, h, w)`` (voxel indices): trilinear resampling is exact on it."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    arr = sum(c * g for c, g in zip(coef, grids))[None]
    img = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr)), meta={"filename_or_obj": name})
    return {"image": img, "aniso_d": _level(*spacing), "spacing": list(spacing)}


@pytest.mark.parametrize("scale", [(1.25, 2.0, 2.0), (1.0, 0.75, 0.75), (0.8, 1.5, 1.5)])
def test_crop_resamples_by_the_drawn_scale(scale):
    coef = (3.0, 0.5, -0.25)
    data = _ramp((20, 64, 64), coef, (1.0, 1.0, 1.0))
    draw = {"aniso_d": _level(scale[0], scale[1], scale[2]), "scale": list(scale), "roi": [4, 16, 16]}
    tr = SpadRandAffineCropd("image", rotate_prob=0.0).set_random_state(0)
    out = tr({**data, "spad_draw": draw})
    img = out["image"][0]
    assert tuple(img.shape) == (4, 16, 16)
    assert out["aniso_d"] == draw["aniso_d"] and "spad_draw" not in out
    assert out["spacing"] == pytest.approx(list(scale))
    c = (1, 7, 7)  # next to the centre: its neighbours sample inside the image
    for axis in range(3):
        nxt = list(c)
        nxt[axis] += 1
        step = float(img[tuple(nxt)] - img[c])
        assert step == pytest.approx(coef[axis] * scale[axis], abs=1e-4)  # one output voxel = scale input voxels


def test_crop_without_scale_or_rotation_is_slicing():
    data = _ramp((20, 40, 36), (10000.0, 100.0, 1.0), (2.0, 1.0, 1.0))
    tr = SpadRandAffineCropd("image", tokens=(2, 1, 1), rotate_prob=0.0).set_random_state(5)
    img = tr(dict(data))["image"][0].numpy()
    assert img.shape == (2 * 8, 16, 16)
    v = int(img[0, 0, 0])
    start = (v // 10000, v % 10000 // 100, v % 100)
    ref = data["image"][0].numpy()[tuple(slice(s, s + n) for s, n in zip(start, img.shape))]
    np.testing.assert_array_equal(img, ref)


def test_rotation_of_a_2d_image_stays_in_plane():
    data = _ramp((1, 64, 64), (0.0, 1.0, 0.0), (32.0, 1.0, 1.0))
    tr = SpadRandAffineCropd("image", tokens=(1, 1, 1), rotate_prob=1.0).set_random_state(3)
    img = tr(data)["image"][0, 0]
    gh, gw = float(img[8, 7] - img[7, 7]), float(img[7, 8] - img[7, 7])
    assert math.hypot(gh, gw) == pytest.approx(1.0, abs=1e-4)  # a rotated unit ramp: the gradient keeps its norm
    assert abs(gw) > 1e-3  # and it is rotated


def test_sampler_batches_hold_one_level_of_the_drawn_scales():
    items = [(sp, sh) for sp, sh in CASES for _ in range(4)]
    aug = SpadScaleAugment(tokens=(1, 1, 1))
    kw = dict(scale_augment=aug, spacing=[sp for sp, _ in items], shape=[sh for _, sh in items], seed=3)
    sampler = AnisoBatchSampler([0] * len(items), 3, drop_last=True, **kw)
    assert len(sampler) == len(items) // 3
    first = list(sampler)
    assert len(first) == len(sampler)
    for batch in first:
        assert len({draw["aniso_d"] for _, draw in batch}) == 1
        for i, draw in batch:
            sp = items[i][0]
            s = draw["scale"]
            expected = 5 if items[i][1][0] == 1 else _level(sp[0] * s[0], sp[1] * s[1], sp[2] * s[2])
            assert draw["aniso_d"] == expected
    assert list(sampler) == first  # same epoch, same draws
    sampler.set_epoch(1)
    assert list(sampler) != first
    # ranks split the same global list
    ranks = [AnisoBatchSampler([0] * len(items), 3, drop_last=True, num_replicas=2, rank=r, **kw) for r in (0, 1)]
    glob = ranks[0].global_batches()
    assert [list(r) for r in ranks] == [glob[0::2], glob[1::2]]


def test_dataloader_samples_carry_their_drawn_level():
    rng = np.random.default_rng(0)
    base = []
    for sp, sh in [((1.0, 1.0, 1.0), (24, 40, 40)), ((1.9, 1.0, 1.0), (16, 40, 40)), ((2.5, 1.0, 1.0), (8, 36, 40))]:
        for _ in range(3):
            img = MetaTensor(torch.from_numpy(rng.random((3, *sh), dtype=np.float32)))
            base.append({"image": img, "aniso_d": _level(*sp), "spacing": list(sp), "shape": list(sh)})
    aug = SpadScaleAugment(tokens=(1, 2, 2), patch_size=16, scale_xy=(0.75, 1.0), scale_xy_prob=1.0)
    sampler = AnisoBatchSampler(
        [d["aniso_d"] for d in base], 2, scale_augment=aug, spacing=[d["spacing"] for d in base],
        shape=[d["shape"] for d in base], seed=0,
    )  # fmt: skip
    dataset = SpadDrawDataset(base, SpadRandAffineCropd("image", tokens=(1, 2, 2), rotate_prob=0.0))
    draws = {i: draw for batch in sampler.global_batches() for i, draw in batch}
    seen = 0
    for batch, indices in zip(DataLoader(dataset, batch_sampler=sampler), sampler):
        levels = [draws[i]["aniso_d"] for i, _ in indices]
        assert batch["aniso_d"].tolist() == levels and len(set(levels)) == 1
        assert batch["image"].shape[2:] == (max(16 >> levels[0], 1) if levels[0] < 5 else 1, 32, 32)
        seen += len(indices)
    assert seen >= len(base) - 2


@pytest.mark.parametrize("config", [["train.json"], ["train.json", "train_tokenizer.json"]])
def test_pretraining_configs_switch_the_augmentation(config, tmp_path):
    from pathlib import Path

    from monai.bundle import ConfigParser

    path = [str(Path(__file__).resolve().parents[2] / "bundles" / "spad_vit" / "configs" / c) for c in config]
    items = [{"image": "a.png", "aniso_d": 5, "spacing": [32.0, 1.0, 1.0], "shape": [1, 64, 64]}] * 4
    for on in (True, False):
        parser = ConfigParser()
        parser.read_config(path)
        parser.update({"augment": on, "augment_scale": on, "train#datalist": items, "batch_size": 2,
                       "cache_dir": str(tmp_path)})  # fmt: skip
        names = [type(t).__name__ for t in parser.get_parsed_content("train#random_transforms")]
        crop = parser.get_parsed_content("train#crop")
        sampler = parser.get_parsed_content("train#batch_sampler")
        if on:
            assert names[0] == "SpadRandAffineCropd" and names[-1] == "EnsureTyped"
            assert {"RandFlipd", "RandScaleIntensityd", "RandScaleIntensityFixedMeand", "OneOf"} <= set(names)
            assert crop.rotate_prob == 0.3 and isinstance(sampler.scale_augment, SpadScaleAugment)
            assert all(isinstance(i, SeededSample) and i.draw is not None for b in sampler for i in b)
        else:
            assert names == ["SpadRandAffineCropd", "EnsureTyped"]
            assert crop.rotate_prob == 0.0 and sampler.scale_augment is None
            assert all(isinstance(i, SeededSample) and i.draw is None for b in sampler for i in b)


@pytest.mark.parametrize("transform", [SpadRandAffineCropd("image"), SpadRandCropd("image")])
def test_depth_first_crops_refuse_a_2d_image_naming_the_file_and_the_transform(transform):
    img = MetaTensor(torch.rand(1, 8, 8), meta={"filename_or_obj": "slice.png"})
    with pytest.raises(ValueError, match=rf"slice\.png: {type(transform).__name__} expects \(C, D, H, W\)"):
        transform({"image": img, "aniso_d": 0, "spacing": [1.0, 1.0, 1.0]})
