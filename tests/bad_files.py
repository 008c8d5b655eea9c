"""Damaged and degenerate image files for the fuzz tests: ones installed packages ship (nibabel's test DICOMs, made
truncated and header-less here) and generated ones (truncated gzip, NaN, 1x1x1, complex dtype, 4D, RGB PNG, text
named .png, a label with an unexpected value)."""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
from PIL import Image

NIBABEL_DICOM = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "0.dcm")
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def truncate(src: str, dst: str, keep: float = 0.5) -> str:
    """Copy of ``src`` cut to ``keep`` of its bytes (a gzip loses its end-of-stream; a DICOM its pixel data)."""
    data = open(src, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[: max(1, int(len(data) * keep))])
    return dst


def nifti(path: str, arr: np.ndarray, affine: np.ndarray = AFFINE) -> str:
    nib.save(nib.Nifti1Image(arr, affine), path)
    return path


def png(path: str, arr: np.ndarray) -> str:
    Image.fromarray(arr).save(path)
    return path


def dicom_files(folder: str) -> dict[str, str]:
    """``{"dicom_truncated", "dicom_headerless"}`` from nibabel's shipped test DICOM: half of it, and it without the
    128-byte preamble, ``DICM`` magic and file-meta group (a bare data set)."""
    os.makedirs(folder, exist_ok=True)
    if not os.path.isfile(NIBABEL_DICOM):  # a nibabel installed without its test data
        return {}
    raw = open(NIBABEL_DICOM, "rb").read()
    out = {"dicom_truncated": truncate(NIBABEL_DICOM, os.path.join(folder, "dicom_truncated.dcm"))}
    # the file-meta group (0002,xxxx) follows the magic; its length is in (0002,0000), a 4-byte value at 140
    meta_len = int.from_bytes(raw[140:144], "little")
    with open(os.path.join(folder, "dicom_headerless.dcm"), "wb") as f:
        f.write(raw[144 + meta_len :])
    out["dicom_headerless"] = os.path.join(folder, "dicom_headerless.dcm")
    return out


def good_dicom(path: str) -> str | None:
    """nibabel's shipped test DICOM (one 256 x 256 MR slice), copied to ``path``; None when nibabel lacks it."""
    if not os.path.isfile(NIBABEL_DICOM):
        return None
    shutil.copy(NIBABEL_DICOM, path)
    return path


def volumes(folder: str, good: str, prefix: str = "", suffix: str = ".nii.gz") -> dict[str, str]:
    """Damaged 3D volumes in ``folder`` named ``<prefix><kind><suffix>``: ``truncated_gzip`` (a copy of the good
    ``good`` cut in half), ``nan`` (one NaN voxel), ``tiny`` (1x1x1), ``complex`` (complex64 voxels), ``four_d``
    (two volumes in a 4D file)."""
    os.makedirs(folder, exist_ok=True)
    p = lambda kind: os.path.join(folder, f"{prefix}{kind}{suffix}")  # noqa: E731
    shape = tuple(int(s) for s in nib.load(good).shape[:3])
    affine = nib.load(good).affine
    nan = np.ones(shape, np.float32)
    nan[0, 0, 0] = np.nan
    return {
        "truncated_gzip": truncate(good, p("truncated_gzip")),
        "nan": nifti(p("nan"), nan, affine),
        "tiny": nifti(p("tiny"), np.ones((1, 1, 1), np.float32)),
        "complex": nifti(p("complex"), np.ones(shape, np.complex64), affine),
        "four_d": nifti(p("four_d"), np.ones((*shape, 2), np.float32), affine),
    }


def images_2d(folder: str, good: str) -> dict[str, str]:
    """Damaged 2D files in ``folder``: ``truncated_png`` (``good`` cut in half), ``text_png`` (text named .png),
    ``rgb_png`` (an 8-bit RGB image), ``tiny_png`` (1x1 grey), plus :func:`dicom_files`."""
    os.makedirs(folder, exist_ok=True)
    out = {"truncated_png": truncate(good, os.path.join(folder, "truncated_png.png"))}
    with open(os.path.join(folder, "text_png.png"), "w", encoding="utf-8") as f:
        f.write("not an image\n")
    out["text_png"] = os.path.join(folder, "text_png.png")
    rgb = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    out["rgb_png"] = png(os.path.join(folder, "rgb_png.png"), rgb)
    out["tiny_png"] = png(os.path.join(folder, "tiny_png.png"), np.full((1, 1), 7, np.uint8))
    return {**out, **dicom_files(folder)}
