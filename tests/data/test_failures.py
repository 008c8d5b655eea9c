"""Named load errors and per-item failure records: FileErrorDataset, collate_skip_failed, LoadImageNamedd,
MinSpatialSized, and the datalist builders' ``unreadable="record"``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from monai.data import DataLoader, MetaTensor
from monai.transforms import Compose, LoadImaged

from medfm.data import (
    FAILED_KEY,
    FileErrorDataset,
    build_image_folder_datalist,
    build_spad_datalist,
    collate_skip_failed,
    error_reason,
)
from medfm.transforms import LoadImageNamedd, MinSpatialSized

from .. import bad_files


@pytest.fixture
def files(tmp_path):
    good = bad_files.nifti(str(tmp_path / "good.nii.gz"), np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    raw = bad_files.nifti(str(tmp_path / "big.nii.gz"), np.random.default_rng(0).random((32, 32, 32), np.float32))
    return {"good": good, "truncated": bad_files.truncate(raw, str(tmp_path / "truncated.nii.gz"))}


def _chain(e: BaseException) -> str:
    out = []
    while e is not None:
        out.append(str(e))
        e = e.__cause__ or e.__context__
    return " | ".join(out)


def test_monai_loader_does_not_name_a_truncated_gzip_but_ours_does(files):
    with pytest.raises(Exception) as plain:
        LoadImaged("image")({"image": files["truncated"]})
    assert "truncated.nii.gz" not in _chain(plain.value)  # why LoadImageNamedd exists
    with pytest.raises(ValueError, match=r"truncated\.nii\.gz: cannot be read .*EOFError"):
        LoadImageNamedd("image")({"image": files["truncated"]})
    assert LoadImageNamedd("image", image_only=True)({"image": files["good"]})["image"].shape == (2, 3, 4)


def test_dataset_names_the_file_when_training_and_skips_it_at_inference(files):
    data = [{"image": files["good"]}, {"image": files["truncated"], "case": "c1"}]
    load = Compose([LoadImaged("image", ensure_channel_first=True)])
    strict = FileErrorDataset(data, load)
    assert strict[0]["image"].shape == (1, 2, 3, 4)
    with pytest.raises(ValueError) as e:
        strict[1]
    assert str(e.value).startswith(f"case c1; {files['truncated']}: EOFError: Compressed file ended")
    lenient = FileErrorDataset(data, load, skip_failed=True)
    marker = lenient[1]
    assert set(marker) == {FAILED_KEY}
    assert marker[FAILED_KEY]["file"] == f"case c1; {files['truncated']}"
    assert marker[FAILED_KEY]["reason"].startswith("EOFError")
    # a datalist item whose header could not be read fails without loading, with its reason
    recorded = FileErrorDataset([{"image": "/x/a.png", "load_error": "cannot read"}], load, skip_failed=True)
    assert recorded[0] == {FAILED_KEY: {"file": "/x/a.png", "reason": "cannot read"}}
    with pytest.raises(ValueError, match="/x/a.png: cannot read"):
        FileErrorDataset([{"image": "/x/a.png", "load_error": "cannot read"}], load)[0]


def test_collate_keeps_good_items_and_lists_failures(files):
    data = [{"image": files["good"]}, {"image": files["truncated"]}, {"image": files["good"]}]
    ds = FileErrorDataset(data, LoadImaged("image", ensure_channel_first=True), skip_failed=True)
    batches = list(DataLoader(ds, batch_size=3, collate_fn=collate_skip_failed))
    assert len(batches) == 1
    batch = batches[0]
    assert batch["image"].shape == (2, 1, 2, 3, 4)
    assert [f["file"] for f in batch[FAILED_KEY]] == [files["truncated"]]
    only_bad = list(DataLoader(ds, batch_size=1, collate_fn=collate_skip_failed))[1]
    assert set(only_bad) == {FAILED_KEY}
    good_only = collate_skip_failed([ds[0]])
    assert FAILED_KEY not in good_only and good_only["image"].shape == (1, 1, 2, 3, 4)


def test_error_reason_skips_monai_wrappers():
    try:
        try:
            raise EOFError("cut\nshort")
        except EOFError as inner:
            raise RuntimeError("applying transform <Compose>") from inner
    except RuntimeError as e:
        assert error_reason(e) == "EOFError: cut short"


def test_min_spatial_size_names_the_file_and_the_minimum():
    img = MetaTensor(torch.zeros(1, 1, 1, 1), meta={"filename_or_obj": "/d/tiny.nii.gz"})
    msg = r"/d/tiny.nii.gz: 'image' of spatial shape \(1, 1, 1\).*at least \(1, 16, 16\)"
    with pytest.raises(ValueError, match=msg):
        MinSpatialSized("image", [1, 16, 16])({"image": img})
    ok = MetaTensor(torch.zeros(1, 1, 16, 20))
    assert MinSpatialSized("image", [1, 16, 16])({"image": ok})["image"] is ok
    with pytest.raises(ValueError, match=r"at least \(8, 8, 8\)"):
        MinSpatialSized("image", 8)({"image": MetaTensor(torch.zeros(1, 8, 8, 7))})
    with pytest.raises(ValueError, match="min_size"):
        MinSpatialSized("image", 0)


def test_datalists_record_unreadable_files_when_asked(tmp_path):
    images = tmp_path / "spad" / "images"
    images.mkdir(parents=True)
    bad_files.png(str(images / "ok.png"), np.full((20, 20), 9, np.uint8))
    (images / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png: cannot read the image header"):
        build_spad_datalist(str(tmp_path / "spad"))
    items = build_spad_datalist(str(tmp_path / "spad"), unreadable="record")
    assert [os.path.basename(d["image"]) for d in items] == ["ok.png", "text.png"]
    assert "load_error" not in items[0] and "text.png: cannot read the image header" in items[1]["load_error"]

    derm = tmp_path / "midol" / "dermoscopy"
    derm.mkdir(parents=True)
    bad_files.png(str(derm / "ok.png"), np.full((20, 20, 3), 9, np.uint8))
    (derm / "text.png").write_text("not an image")
    (derm / "notes.txt").write_text("a file of another type")
    with pytest.raises(ValueError):
        build_image_folder_datalist(str(tmp_path / "midol"), modalities=["dermoscopy"])
    items = build_image_folder_datalist(str(tmp_path / "midol"), modalities=["dermoscopy"], unreadable="record")
    errors = {os.path.basename(d["image"]): d.get("load_error") for d in items}
    assert errors["ok.png"] is None
    assert "cannot read the image" in errors["text.png"] and "unsupported file type" in errors["notes.txt"]
    with pytest.raises(ValueError, match="unreadable"):
        build_spad_datalist(str(tmp_path / "spad"), unreadable="skip")
