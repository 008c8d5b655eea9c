"""Tests of SPAD-ViT's datalist, demo generator and aniso batch sampler (medfm.data.spad, .aniso_sampler)."""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from PIL import Image

from medfm.data import (
    SPAD_LABELS,
    AnisoBatchSampler,
    aniso_batch_sampler,
    build_spad_datalist,
    ensure_demo_spad,
    generate_synthetic_spad,
)
from medfm.transforms import ReorientToDepthd, RowsFirstd, ScaleIntensitySpadd

SPAD_CONFIGS = Path(__file__).resolve().parents[2] / "bundles" / "spad_vit" / "configs"


def _level(sz: float, sy: float, sx: float) -> int:
    """floor(log2(clip(sz / min(sy, sx), 1, 32))) by repeated halving (independent of the library)."""
    ratio, level = min(max(sz / min(sy, sx), 1.0), 32.0), 0
    while ratio >= 2.0 - 1e-12 and level < 5:
        ratio, level = ratio / 2.0, level + 1
    return level


def _nifti(path, shape, spacing, dtype=np.float32) -> str:
    arr = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))
    return str(path)


def _loaded(item: dict) -> dict:
    """Load an item as the SPAD pipeline does (LoadImaged, EnsureChannelFirstd, RowsFirstd, ReorientToDepthd)."""
    keys = [k for k in ("image", "label") if k in item]
    return Compose([LoadImaged(keys), EnsureChannelFirstd(keys), RowsFirstd(keys), ReorientToDepthd(keys)])(item)


def _dicom_slice(itk, array: np.ndarray, path: str, spacing, tags: dict | None = None) -> None:
    img = itk.image_from_array(np.ascontiguousarray(array))
    img.SetSpacing(list(spacing))
    io = itk.GDCMImageIO.New()
    io.SetKeepOriginalUID(True)
    meta = itk.MetaDataDictionary()
    for tag, value in {"0008|0060": "CT", **(tags or {})}.items():
        meta[tag] = value
    img.SetMetaDataDictionary(meta)
    itk.imwrite(img, path, imageio=io)


@pytest.fixture
def mixed(tmp_path):
    """A dataset with an 8-bit PNG, a 16-bit PNG, a JPEG and NIfTI volumes of several orientations/spacings."""
    img, lab = tmp_path / "images", tmp_path / "labels"
    img.mkdir()
    lab.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(img / "a.png")
    Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8)).save(lab / "a.png")
    Image.fromarray(rng.integers(0, 60000, (8, 9)).astype(np.uint16)).save(img / "b16.png")
    Image.fromarray(rng.integers(0, 256, (8, 9, 3), dtype=np.uint8)).save(img / "c.jpg")
    spacings = {"ax": (0.7, 0.7, 5.0), "sag": (3.0, 0.8, 0.8), "iso": (1.0, 1.0, 1.0), "thick": (0.5, 0.5, 20.0)}
    (img / "sub").mkdir()
    for name, sp in spacings.items():
        folder = "sub/" if name == "iso" else ""
        _nifti(img / f"{folder}{name}.nii.gz", (6, 7, 5), sp)
    _nifti(lab / "ax.nii.gz", (6, 7, 5), spacings["ax"], np.uint8)
    return tmp_path, spacings


def test_datalist_fields(mixed):
    root, spacings = mixed
    items = {os.path.relpath(d["image"], root / "images"): d for d in build_spad_datalist(str(root))}
    assert list(items) == sorted(items)
    assert set(items) == {"a.png", "b16.png", "c.jpg", "ax.nii.gz", "sag.nii.gz", "sub/iso.nii.gz", "thick.nii.gz"}
    for name, d in items.items():
        assert os.path.isabs(d["image"]) and os.path.isfile(d["image"])
        fields = {"image", "aniso_d", "spacing", "shape", "dim", "intensity"}
        assert set(d) == fields | ({"label"} if name[0] in "a" else set())
    assert items["a.png"]["label"] == str(root / "labels" / "a.png")
    assert items["ax.nii.gz"]["label"] == str(root / "labels" / "ax.nii.gz")
    for name, expected in [("a.png", "uint8"), ("c.jpg", "uint8"), ("b16.png", "percentile")]:
        d = items[name]
        assert (d["dim"], d["aniso_d"], d["intensity"], d["spacing"]) == (2, 5, expected, [32.0, 1.0, 1.0])
    for name, sp in spacings.items():
        d = items[f"sub/{name}.nii.gz" if name == "iso" else f"{name}.nii.gz"]
        depth = int(np.argmax(sp)) if len(set(sp)) > 1 else 2
        rest = [sp[a] for a in range(3) if a != depth]
        assert d["spacing"] == pytest.approx([sp[depth], *rest])
        assert (d["dim"], d["intensity"]) == (3, "percentile")
        assert d["aniso_d"] == _level(sp[depth], *rest)
    assert [items[n]["aniso_d"] for n in ("ax.nii.gz", "sag.nii.gz", "sub/iso.nii.gz", "thick.nii.gz")] == [2, 1, 0, 5]


def test_datalist_agrees_with_reorientation(mixed):
    root, _ = mixed
    for item in build_spad_datalist(str(root)):
        out = _loaded(item)
        assert out["aniso_d"] == item["aniso_d"], item["image"]
        assert out["spacing"] == pytest.approx(item["spacing"]), item["image"]
        assert (out["image"].shape[1] == 1) == (item["dim"] == 2)


def test_top_level_volume_and_2d_image_collate_in_one_batch(mixed, tmp_path):
    """A volume at the top level (slices >= 32x the pixels) and 2D images share the aniso_d = 5 batches: each is
    cropped to one slice, so the batches of the shipped pre-training pipeline stack."""
    root, _ = mixed
    items = build_spad_datalist(str(root))
    assert sorted(os.path.basename(d["image"]) for d in items if d["aniso_d"] == 5) == [
        "a.png", "b16.png", "c.jpg", "thick.nii.gz"
    ]
    parser = ConfigParser()
    parser.read_config(str(SPAD_CONFIGS / "train.json"))
    parser.update({"train#datalist": items, "cache_dir": str(tmp_path / "cache"), "batch_size": 4,
                   "crop_tokens": [2, 1, 1], "num_workers": 0})  # fmt: skip
    loader = parser.get_parsed_content("train#dataloader")
    (batch,) = list(loader)  # 7 items, drop_last: one batch of 4, the four level-5 items
    assert tuple(batch["image"].shape) == (4, 3, 1, 16, 16)
    assert batch["aniso_d"].tolist() == [5, 5, 5, 5]


def test_datalist_dicom(tmp_path):
    itk = pytest.importorskip("itk")
    img_dir = tmp_path / "images"
    (img_dir / "series").mkdir(parents=True)
    rng = np.random.default_rng(0)
    plane = rng.integers(0, 4000, (20, 30)).astype(np.int16)  # (rows, columns), as pydicom's pixel_array
    _dicom_slice(itk, plane, str(img_dir / "xray.dcm"), (0.7, 0.5))  # (column, row) spacing
    uid = "1.2.826.0.1.3680043.2.1125.1.424242"
    vol = rng.integers(-1000, 1000, (5, 12, 10)).astype(np.int16)  # (z, y, x)
    for k in range(5):
        tags = {"0020|000e": uid, "0020|000d": uid + ".0", "0008|0018": f"{uid}.1.{k}", "0020|0013": str(k + 1),
                "0020|0032": f"-3\\-4\\{k * 3.5}", "0020|0037": "1\\0\\0\\0\\1\\0", "0018|0050": "3.5"}  # fmt: skip
        _dicom_slice(itk, vol[k], str(img_dir / "series" / f"s{k:03d}.dcm"), (0.6, 0.8), tags)
    items = {os.path.basename(d["image"]): d for d in build_spad_datalist(str(tmp_path))}
    assert set(items) == {"xray.dcm", "series"}
    xray, series = items["xray.dcm"], items["series"]
    assert (xray["dim"], xray["aniso_d"], xray["intensity"]) == (2, 5, "percentile")
    assert xray["spacing"] == pytest.approx([32 * 0.5, 0.5, 0.7])  # rows first: (row, column) spacing
    assert (series["dim"], series["aniso_d"]) == (3, _level(3.5, 0.6, 0.8))
    assert series["spacing"] == pytest.approx([3.5, 0.6, 0.8])
    assert os.path.isdir(series["image"])
    for item in (xray, series):
        out = _loaded(item)
        assert out["aniso_d"] == item["aniso_d"] and out["spacing"] == pytest.approx(item["spacing"])
    np.testing.assert_array_equal(_loaded(xray)["image"][0, 0].numpy(), plane)
    out = _loaded(series)["image"]
    assert tuple(out.shape) == (1, 5, 10, 12)
    np.testing.assert_array_equal(out[0].numpy(), vol.transpose(0, 2, 1))  # (z, x, y)


def test_datalist_classes(mixed):
    root, _ = mixed
    names = ["a.png", "b16.png", "c.jpg", "ax.nii.gz", "sag.nii.gz", "sub/iso.nii.gz", "thick.nii.gz"]
    with open(root / "classes.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "class"], *[[n, i % 3] for i, n in enumerate(names)]])
    items = build_spad_datalist(str(root), classes_file="classes.csv")
    got = {os.path.relpath(d["image"], root / "images"): d["class"] for d in items}
    assert got == {n: i % 3 for i, n in enumerate(names)}
    with open(root / "partial.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "class"], ["a.png", 1]])
    with pytest.raises(ValueError, match=r"partial\.csv.*no class for image"):
        build_spad_datalist(str(root), classes_file=str(root / "partial.csv"))
    with open(root / "extra.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "class"], *[[n, 0] for n in names], ["zzz.png", 1]])
    with pytest.raises(ValueError, match="zzz.png"):
        build_spad_datalist(str(root), classes_file="extra.csv")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        build_spad_datalist(str(root), classes_file="nope.csv")


def test_datalist_errors(tmp_path, mixed):
    root, _ = mixed
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        build_spad_datalist(str(tmp_path / "missing_dir"))
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "images" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty[/\\]images"):
        build_spad_datalist(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"b16\.png has no label"):
        build_spad_datalist(str(root), require_labels=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "labels" / "ax.png")
    with pytest.raises(ValueError, match="several labels"):
        build_spad_datalist(str(root))
    os.remove(root / "labels" / "ax.png")
    (root / "images" / "broken.nii.gz").write_bytes(b"not a nifti file at all")
    with pytest.raises(ValueError, match=r"broken\.nii\.gz: cannot read"):
        build_spad_datalist(str(root))
    os.remove(root / "images" / "broken.nii.gz")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"broken\.png: cannot read"):
        build_spad_datalist(str(root))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("spad") / "demo"
    names = generate_synthetic_spad(str(root), num_2d=4, num_3d=6, size_2d=64, size_3d=48, seed=1)
    return root, names


def test_demo_files_and_pipeline(demo):
    root, names = demo
    assert len(names) == 10
    items = build_spad_datalist(str(root), require_labels=True, classes_file="classes.csv")
    assert len(items) == 10
    pre = Compose([
        LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]), ReorientToDepthd(["image", "label"]),
        ScaleIntensitySpadd("image"),
    ])  # fmt: skip
    levels = Counter()
    for item in items:
        out = pre(item)
        levels[out["aniso_d"]] += 1
        assert out["aniso_d"] == item["aniso_d"]
        image, label = out["image"], out["label"]
        assert image.shape == label.shape
        # every organ of the shared label set is present, nothing else
        assert set(torch.unique(label).int().tolist()) == set(SPAD_LABELS.values()) == {0, 1, 2, 3}
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        if item["dim"] == 3:  # depth = round(extent / slice spacing), in-plane 48 x 48 at 1 mm
            assert tuple(image.shape[1:]) == (round(48 / item["spacing"][0]), 48, 48)
            assert torch.equal(label.affine, image.affine)
        else:
            assert tuple(image.shape[1:]) == (1, 64, 64)
    assert levels == {5: 4, 0: 2, 1: 2, 2: 2}


def test_demo_class_is_a_visible_lesion(demo):
    """Class 1 <=> a bright spot inside the lesion's organ, measured on the raw files."""
    root, _ = demo
    with open(root / "classes.csv", newline="") as f:
        classes = {r["image"]: int(r["class"]) for r in csv.DictReader(f)}
    assert Counter(n.endswith(".png") for n, c in classes.items() if c == 1) == {True: 2, False: 3}
    for name, cls in classes.items():
        if name.endswith(".png"):
            img = np.asarray(Image.open(root / "images" / name), dtype=float)
            lab = np.asarray(Image.open(root / "labels" / name))
            bright = (img[lab == SPAD_LABELS["lung"]] > 150).sum()  # lungs are below ~130
        else:
            img = np.asarray(nib.load(root / "images" / name).dataobj)
            lab = np.asarray(nib.load(root / "labels" / name).dataobj)
            threshold = 250.0 if name.startswith("ct") else 600.0  # liver: 90 HU / 300, noise sd 15 / 10
            bright = (img[lab == SPAD_LABELS["liver"]] > threshold).sum()
        assert (bright >= 4) == (cls == 1), (name, cls, bright)


def test_demo_is_deterministic_and_refuses_overwrite(demo, tmp_path):
    root, _ = demo
    with pytest.raises(FileExistsError, match="xray_000.png"):
        generate_synthetic_spad(str(root), num_2d=4, num_3d=6, size_2d=64, size_3d=48, seed=1)
    other = tmp_path / "again"
    generate_synthetic_spad(str(other), num_2d=4, num_3d=6, size_2d=64, size_3d=48, seed=1)
    for rel in ("images/xray_002.png", "labels/mr_001.nii.gz", "images/ct_002.nii.gz", "classes.csv"):
        a, b = root / rel, other / rel
        if rel.endswith(".nii.gz"):
            assert np.array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))
        else:
            assert a.read_bytes() == b.read_bytes()
    with pytest.raises(ValueError):
        generate_synthetic_spad(str(tmp_path / "bad"), num_2d=0, num_3d=0)


def test_ensure_demo_spad(tmp_path, demo):
    target = tmp_path / "new"
    assert ensure_demo_spad(str(target), num_2d=2, num_3d=3, size_2d=32, size_3d=32) == str(target)
    assert len(os.listdir(target / "images")) == 5
    root, _ = demo
    before = {p: os.path.getmtime(root / "images" / p) for p in os.listdir(root / "images")}
    assert ensure_demo_spad(str(root)) == str(root)
    assert {p: os.path.getmtime(root / "images" / p) for p in os.listdir(root / "images")} == before
    (tmp_path / "user_dir").mkdir()
    with pytest.raises(ValueError, match="user_dir.*no images"):
        ensure_demo_spad(str(tmp_path / "user_dir"))
    assert os.listdir(tmp_path / "user_dir") == []


LEVELS = [0] * 7 + [1] * 5 + [2] * 3 + [5] * 10


def _epoch(sampler: AnisoBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_single_rank(shuffle):
    sampler = AnisoBatchSampler(LEVELS, batch_size=4, shuffle=shuffle, seed=5)
    expected = sum(math.ceil(LEVELS.count(a) / 4) for a in set(LEVELS))  # 2 + 2 + 1 + 3
    assert len(sampler) == expected == 8
    batches = _epoch(sampler, 0)
    assert len(batches) == 8
    assert all(len({LEVELS[i] for i in b}) == 1 and 1 <= len(b) <= 4 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(len(LEVELS)))
    if shuffle:
        assert _epoch(sampler, 1) != batches and _epoch(sampler, 0) == batches
    else:
        assert batches[0] == [0, 1, 2, 3] and _epoch(sampler, 1) == batches


@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_sampler_ranks(replicas):
    samplers = [AnisoBatchSampler(LEVELS, 4, seed=1, num_replicas=replicas, rank=r) for r in range(replicas)]
    for epoch in (0, 1):
        per_rank = [_epoch(s, epoch) for s in samplers]
        assert len({len(b) for b in per_rank}) == 1
        assert all(len(b) == len(s) == math.ceil(8 / replicas) for b, s in zip(per_rank, samplers))
        counts = Counter(i for batches in per_rank for b in batches for i in b)
        assert set(counts) == set(range(len(LEVELS)))  # every index on some rank
        pad = math.ceil(8 / replicas) * replicas - 8
        if pad == 0:  # disjoint, each index exactly once
            assert set(counts.values()) == {1}
        else:  # only the repeated batches (the first `pad` of the global order) appear twice
            glob = samplers[0].global_batches()
            assert glob[8:] == glob[:pad]
            assert sum(counts.values()) == len(LEVELS) + sum(len(b) for b in glob[:pad])
        assert all(len({LEVELS[i] for i in b}) == 1 for batches in per_rank for b in batches)
    # same global order on every rank; epochs reshuffle it
    s0 = samplers[0]
    assert all(s.global_batches() == s0.global_batches() for s in samplers)
    assert _epoch(s0, 0) != _epoch(s0, 1)


def test_sampler_drop_last():
    sampler = AnisoBatchSampler(LEVELS, 4, drop_last=True, num_replicas=2, rank=1)
    full = sum(LEVELS.count(a) // 4 for a in set(LEVELS))  # 1 + 1 + 0 + 2
    assert len(sampler) == full // 2 == 2
    batches = list(sampler)
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)


def test_sampler_with_dataloader_and_datalist():
    datalist = [{"image": f"img{i}", "aniso_d": a} for i, a in enumerate(LEVELS)]
    sampler = aniso_batch_sampler(datalist, batch_size=3, seed=2)
    loader = torch.utils.data.DataLoader(datalist, batch_sampler=sampler, collate_fn=lambda b: b)
    seen = []
    for batch in loader:
        assert len({d["aniso_d"] for d in batch}) == 1
        seen += [d["image"] for d in batch]
    assert sorted(seen) == sorted(d["image"] for d in datalist)
    assert len(loader) == len(sampler) == sum(math.ceil(LEVELS.count(a) / 3) for a in set(LEVELS))


def test_sampler_ill_args():
    for kwargs in [{"batch_size": 0}, {"batch_size": 2, "rank": 2, "num_replicas": 2}, {"batch_size": 2.5}]:
        with pytest.raises(ValueError):
            AnisoBatchSampler([0, 1], **kwargs)
    with pytest.raises(ValueError, match="empty"):
        AnisoBatchSampler([], 2)
    with pytest.raises(ValueError, match="integers"):
        AnisoBatchSampler([0, 1.5], 2)
    with pytest.raises(ValueError, match="drop_last"):
        AnisoBatchSampler([0, 0, 1], 4, drop_last=True)
    with pytest.raises(TypeError):  # the sampler's options are keywords (a third positional was once ``shuffle``)
        AnisoBatchSampler([0, 1, 0, 1], 2, False)
    with pytest.raises(ValueError, match=r"item 1 \(b\.png\)"):
        aniso_batch_sampler([{"image": "a.png", "aniso_d": 5}, {"image": "b.png"}], 2)


def test_cli_spad(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("make_demo_data", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "cli"
    argv = ["spad", "--out", str(out), "--num-2d", "2", "--num-3d", "3", "--slice-spacings", "1", "4", "--seed", "1"]
    assert module.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Wrote 5 synthetic images" in printed
    items = build_spad_datalist(str(out), require_labels=True, classes_file="classes.csv")
    # slice spacings cycle 1, 4, 1 mm over in-plane 1 mm: aniso_d 0, 2, 0; the PNGs are 2D (5)
    assert sorted(d["aniso_d"] for d in items) == [0, 0, 2, 5, 5]
    with pytest.raises(SystemExit):  # a second run would overwrite
        module.main(argv)
