"""RowsFirstd: 2D files presented rows first (as PIL / NumPy / pydicom), invertible, wired into the 2D bundles."""

from __future__ import annotations

import os

import itk
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImaged, Resized
from PIL import Image

from medfm.transforms import RowsFirstd

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _asym(h: int = 5, w: int = 9) -> np.ndarray:
    a = np.zeros((h, w), np.uint8)
    a[1, 7] = 255  # row 1, column 7: its transpose would be out of range
    a[3, 2] = 100
    return a


def _load(path: str, keys=("image",)) -> dict:
    pipeline = Compose([LoadImaged(list(keys), ensure_channel_first=True), RowsFirstd(list(keys))])
    return pipeline({k: path for k in keys})


def test_png_is_presented_as_pil_and_numpy_show_it(tmp_path):
    grey, rgb = _asym(), np.random.default_rng(0).integers(0, 256, (5, 9, 3)).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    img = _load(str(tmp_path / "grey.png"))["image"]
    assert img.shape == (1, 5, 9)
    np.testing.assert_array_equal(img[0].numpy(), np.asarray(Image.open(tmp_path / "grey.png")))
    img = _load(str(tmp_path / "rgb.png"))["image"]
    np.testing.assert_array_equal(img.numpy(), np.asarray(Image.open(tmp_path / "rgb.png")).transpose(2, 0, 1))
    # every pixel keeps its world coordinates: MONAI's loaded grid indexes the same pixel as [column, row]
    loaded = LoadImaged("image", ensure_channel_first=True)({"image": str(tmp_path / "grey.png")})["image"]
    for row, col in [(1, 7), (3, 2)]:
        world = img.affine @ torch.tensor([row, col, 0, 1], dtype=torch.float64)
        torch.testing.assert_close(world, loaded.affine @ torch.tensor([col, row, 0, 1], dtype=torch.float64))


def test_single_frame_dicom_is_presented_as_its_pixel_array(tmp_path):
    # pydicom's pixel_array is (Rows, Columns); ITK's array view of the written image is the same matrix
    a = _asym().astype(np.int16) * 10
    itk.imwrite(itk.image_from_array(a), str(tmp_path / "x.dcm"), imageio=itk.GDCMImageIO.New())
    img = _load(str(tmp_path / "x.dcm"))["image"]
    assert (int(img.meta["0028|0010"]), int(img.meta["0028|0011"])) == (5, 9)  # Rows, Columns tags
    assert img.shape == (1, 5, 9)
    np.testing.assert_array_equal(img[0].numpy(), a)


def test_inverse_restores_the_loaded_grid_and_volumes_pass_unchanged(tmp_path):
    Image.fromarray(_asym()).save(tmp_path / "a.png")
    itk.imwrite(itk.image_from_array(_asym().astype(np.int16)), str(tmp_path / "a.dcm"), imageio=itk.GDCMImageIO.New())
    for name in ("a.png", "a.dcm"):
        pre = Compose([LoadImaged("image", ensure_channel_first=True), RowsFirstd("image"), Resized("image", (8, 8))])
        loaded = LoadImaged("image", ensure_channel_first=True)({"image": str(tmp_path / name)})["image"]
        d = pre({"image": str(tmp_path / name)})
        d["pred"] = d["image"].clone()
        back = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(d)["pred"]
        assert back.shape == loaded.shape
        torch.testing.assert_close(back.affine, loaded.affine, atol=1e-6, rtol=0)
    volume = MetaTensor(torch.rand(1, 4, 5, 6))
    out = RowsFirstd("image")({"image": volume})["image"]
    assert out is volume and not out.applied_operations
    with pytest.raises(ValueError, match="channel-first"):
        RowsFirstd("image")({"image": torch.rand(4, 5)})


def _bundle_parser(bundle: str, names: list[str], **override) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([os.path.join(REPO, "bundles", bundle, "configs", n) for n in names])
    parser.update(override)
    return parser


def test_midol_inference_writes_a_non_square_mask_in_the_input_orientation(tmp_path):
    # a 24 x 40 dermoscopy-like image with a wide, short bright block; the "network" marks bright pixels
    h, w = 24, 40
    a = np.zeros((h, w, 3), np.uint8)
    a[2:8, 4:36] = 255
    data_dir = tmp_path / "data" / "dermoscopy"
    data_dir.mkdir(parents=True)
    Image.fromarray(a).save(data_dir / "d0.png")
    parser = _bundle_parser(
        "midol_multimodal", ["inference.json", "demo_inference.json"], dataset_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    pre, post = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("postprocessing")
    d = pre({"image": str(data_dir / "d0.png")})
    assert d["image"].shape[1:] == (32, 32)
    # the network sees the image as PIL shows it (rows first), resized: the block is wide and short
    seen = np.asarray(Image.fromarray(a).resize((32, 32), Image.BILINEAR))[..., 0] > 127
    assert ((d["image"][0].numpy() > 0) == seen).mean() > 0.95
    bright = d["image"][:1]
    d["pred"] = MetaTensor(torch.cat([torch.zeros_like(bright), bright]))  # logits: class 1 where bright
    d["pred"].copy_meta_from(d["image"])
    post(d)
    mask = np.asarray(Image.open(tmp_path / "out" / "d0_seg.png"))
    assert mask.shape == (h, w)
    truth = a[..., 0] > 0
    assert ((mask > 0) == truth).mean() > 0.9  # nearest resampling there and back moves the edges by a pixel


def test_spad_inference_keeps_monai_grid_for_a_non_square_png(tmp_path):
    # SPAD-ViT writes NIfTI on MONAI's (W, H) grid of a PNG: RowsFirstd is undone by Invertd before writing
    h, w = 24, 40
    a = np.zeros((h, w), np.uint8)
    a[2:12, 4:20] = 255
    Image.fromarray(a).save(tmp_path / "p.png")
    pre = _bundle_parser("spad_vit", ["inference.json"]).get_parsed_content("preprocessing")
    d = pre({"image": str(tmp_path / "p.png"), "intensity": "uint8"})
    assert d["image"].shape[1:3] == (1, h)  # (C, D, H, W) rows first
    np.testing.assert_array_equal(d["image"][0, 0, :, :w].numpy() > 0.5, a > 0)  # before any padding to the patch
    d["pred"] = d["image"].clone()
    back = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(d)["pred"]
    assert back.shape[1:] == (w, h)
