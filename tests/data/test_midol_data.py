"""Tests of M-IDoL's image-folder datalist and five-modality demo generator (medfm.data.midol, .synthetic_midol)."""

from __future__ import annotations

import csv
import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from medfm.data import (
    MIDOL_MASK_VALUE,
    MODALITIES,
    UNLABELLED,
    build_image_folder_datalist,
    ensure_demo_midol,
    generate_synthetic_midol,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("midol") / "demo")
    start = time.perf_counter()
    generate_synthetic_midol(root, per_modality=8, size=96, seed=0)
    return root, time.perf_counter() - start


def _png(path, shape=(20, 24, 3)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)).save(path)


def _load(item):
    return np.asarray(Image.open(item["image"]), np.float64) / 255.0


def test_generator_layout_and_speed(demo):
    root, seconds = demo
    assert seconds < 2.0
    items = build_image_folder_datalist(root, masks_subdir=None)
    assert len(items) == 8 * len(MODALITIES)
    for index, modality in enumerate(MODALITIES):
        sub = [it for it in items if it["modality"] == modality]
        assert len(sub) == 8 and {it["modality_index"] for it in sub} == {index}
        assert sorted(it["label"] for it in sub) == [0] * 4 + [1] * 4  # balanced per modality
        im = Image.open(sub[0]["image"])
        assert im.mode == "RGB" and im.size == (96, 96)
    assert set(items[0]) == {"image", "modality", "modality_index", "label"}


def test_generator_deterministic(tmp_path):
    generate_synthetic_midol(str(tmp_path / "a"), per_modality=2, size=48, seed=3)
    generate_synthetic_midol(str(tmp_path / "b"), per_modality=2, size=48, seed=3)
    for m, f in (("oct", "oct_001.png"), ("dermoscopy", "derm_000.png")):
        a, b = (np.asarray(Image.open(tmp_path / d / m / f)) for d in "ab")
        assert np.array_equal(a, b)
    with pytest.raises(FileExistsError, match="already exists"):
        generate_synthetic_midol(str(tmp_path / "a"), per_modality=2, size=48)
    with pytest.raises(ValueError, match="size"):
        generate_synthetic_midol(str(tmp_path / "c"), size=16)


def test_modalities_look_distinct(demo):
    """A nearest-centroid classifier on the mean RGB colour names every image's modality."""
    items = build_image_folder_datalist(demo[0])
    colours = np.array([_load(it).mean((0, 1)) for it in items])
    truth = np.array([it["modality_index"] for it in items])
    centroids = np.array([colours[truth == k].mean(0) for k in range(len(MODALITIES))])
    gaps = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)
    assert gaps[~np.eye(len(MODALITIES), dtype=bool)].min() > 0.1
    pred = np.linalg.norm(colours[:, None] - centroids[None], axis=-1).argmin(1)
    assert np.array_equal(pred, truth)


_FEATURES = {  # one hand-written statistic per modality; class 1 must score higher than every class 0 image
    "xray": lambda a: -((a[..., 0] > 0.12) & (a[..., 0] < 0.32)).mean(),  # dark lung inside the body shrinks
    "fundus": lambda a: (a[..., 1] > 0.8).mean(),  # bright yellow exudates
    "oct": lambda a: a.mean(),  # thicker bright retina
    "dermoscopy": lambda a: (a.mean(-1) < 0.35).mean(),  # large dark lesion
    "pathology": lambda a: (a[..., 1] < 0.35).mean(),  # purple nuclei density
}


@pytest.mark.parametrize("modality", MODALITIES)
def test_class_signal_separable(demo, modality):
    items = [it for it in build_image_folder_datalist(demo[0]) if it["modality"] == modality]
    f = np.array([_FEATURES[modality](_load(it)) for it in items])
    y = np.array([it["label"] for it in items])
    assert f[y == 1].min() > f[y == 0].max()


def test_dermoscopy_masks(demo):
    root = demo[0]
    items = build_image_folder_datalist(root, modalities=("dermoscopy",), masks_subdir="masks")
    assert len(items) == 8 and all(it["modality_index"] == 0 for it in items)
    for it in items:
        assert it["mask"] == os.path.join(root, "masks", "dermoscopy", os.path.basename(it["image"]))
        mask = np.asarray(Image.open(it["mask"]))
        assert mask.ndim == 2 and set(np.unique(mask)) == {0, MIDOL_MASK_VALUE}
        dark = _load(it).mean(-1) < np.asarray(Image.open(it["image"]).convert("L")).mean() / 255 - 0.12
        inside = mask > 0
        assert dark[inside].mean() > 0.8 and dark[~inside].mean() < 0.05  # the mask covers the lesion
        frac = inside.mean()
        assert (frac > 0.12) == bool(it["label"])  # large lesion = class 1
    with pytest.raises(ValueError, match="has no mask"):
        build_image_folder_datalist(root, modalities=("xray",), masks_subdir="masks")


def test_dicom_xray_and_classes(tmp_path):
    itk = pytest.importorskip("itk")
    root = tmp_path / "ds"
    (root / "xray").mkdir(parents=True)
    img = itk.image_from_array(np.random.default_rng(0).integers(0, 4000, (20, 30)).astype(np.int16))
    img.SetSpacing([0.2, 0.2])
    io = itk.GDCMImageIO.New()
    itk.imwrite(img, str(root / "xray" / "cxr.dcm"), imageio=io)
    _png(str(root / "fundus" / "sub" / "f1.jpg"))
    with open(root / "classes.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "class"], ["xray/cxr.dcm", 3]])
    items = build_image_folder_datalist(str(root), modalities=("xray", "fundus"))
    assert [(os.path.relpath(it["image"], root), it["modality_index"], it["label"]) for it in items] == [
        (os.path.join("xray", "cxr.dcm"), 0, 3),
        (os.path.join("fundus", "sub", "f1.jpg"), 1, UNLABELLED),
    ]
    with pytest.raises(ValueError, match=r"no class for image fundus.sub.f1\.jpg"):
        build_image_folder_datalist(str(root), modalities=("xray", "fundus"), require_labels=True)
    assert "label" not in build_image_folder_datalist(str(root), classes_file=None)[0]
    with pytest.raises(ValueError, match="modality 'oct' has no images"):
        build_image_folder_datalist(str(root), modalities=("xray", "oct"), require_any=False)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_image_folder_datalist(str(tmp_path / "missing"))
    (tmp_path / "empty" / "oct").mkdir(parents=True)
    with pytest.raises(ValueError, match="Empty datalist"):
        build_image_folder_datalist(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    _png(str(bad / "oct" / "a.png"))
    (bad / "oct" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt: unsupported file type"):
        build_image_folder_datalist(str(bad))
    (bad / "oct" / "notes.txt").unlink()
    (bad / "oct" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"broken\.png: cannot read the image"):
        build_image_folder_datalist(str(bad))
    (bad / "oct" / "broken.png").unlink()
    with pytest.raises(FileNotFoundError, match="classes file"):
        build_image_folder_datalist(str(bad), require_labels=True)
    (bad / "classes.csv").write_text("image,class\noct/a.png,1\noct/zzz.png,0\n")
    with pytest.raises(ValueError, match="no such image"):
        build_image_folder_datalist(str(bad))
    (bad / "classes.csv").write_text("image,class\noct/a.png,x\n")
    with pytest.raises(ValueError, match="line 2: class 'x'"):
        build_image_folder_datalist(str(bad))
    with pytest.raises(ValueError, match="distinct"):
        build_image_folder_datalist(str(bad), modalities=("oct", "oct"))


def test_ensure_demo(tmp_path):
    root = str(tmp_path / "demo")
    assert ensure_demo_midol(root, per_modality=2, size=32) == root
    before = os.path.getmtime(os.path.join(root, "oct", "oct_000.png"))
    assert ensure_demo_midol(root, per_modality=2, size=32) == root  # existing data untouched
    assert os.path.getmtime(os.path.join(root, "oct", "oct_000.png")) == before
    (tmp_path / "user").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ensure_demo_midol(str(tmp_path / "user"))
    assert os.listdir(tmp_path / "user") == []


def test_folders_of_other_modalities_are_named_when_skipped(tmp_path, caplog):
    """An inference that serves one modality must say which images it leaves out, not drop them silently."""
    for rel in ("dermoscopy/a.png", "fundus/b.png", "fundus/c.png", "masks/dermoscopy/a.png", ".hidden/d.png"):
        _png(str(tmp_path / rel))
    with caplog.at_level(logging.WARNING, logger="medfm.data.midol"):
        datalist = build_image_folder_datalist(str(tmp_path), modalities=("dermoscopy",), masks_subdir="masks")
    assert [os.path.basename(d["image"]) for d in datalist] == ["a.png"]
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "skipped 2 images in" in skipped[0] and skipped[0].split(" in ")[1].startswith(
        str(tmp_path / "fundus")
    )
