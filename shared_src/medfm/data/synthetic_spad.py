"""Synthetic mixed 2D/3D demo data for SPAD-ViT, in the layout :func:`medfm.data.spad.build_spad_datalist` reads.

Demo label set (:data:`SPAD_LABELS`), the same for 2D and 3D: 0 background, 1 lung (both lungs), 2 heart,
3 liver. 2D images are chest-radiograph-like (lungs dark, heart and the liver below the right lung bright,
ribs and noise unlabelled); 3D volumes are CT- or MR-like lower chest / upper abdomen (lungs above the
diaphragm, heart, liver below; spleen, kidneys and spine unlabelled). ``classes.csv`` holds a balanced binary
class: 1 when a bright round lesion (2D: in a lung; 3D: in the liver) is present; the lesion keeps its
organ's label.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .nifti import save_nifti
from .spad import find_spad_images
from .synthetic_shapes import centred_affine, chest_outline, ellipsoid_r2, random_voxel, ribs, to_uint8, unit_grid

__all__ = ["SPAD_LABELS", "ensure_demo_spad", "generate_synthetic_spad"]

SPAD_LABELS = {"background": 0, "lung": 1, "heart": 2, "liver": 3}


def _radiograph(rng: np.random.Generator, n: int, lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """One chest-radiograph-like image (uint8, ``(n, n)``) and its label map (rows top -> bottom)."""
    r, c = unit_grid((n, n))
    j = rng.uniform(-0.03, 0.03, 4)
    k = rng.uniform(0.92, 1.08)
    body, (left, right), heart = chest_outline(r, c, k, lung_row=0.45 + j[1], heart_row=0.63 + j[2])
    img = np.where(body, 0.55 + 0.08 * (r - 0.5) + 0.04 * np.sin(2 * np.pi * (c + j[0])), 0.06)
    lungs = left | right
    liver = (ellipsoid_r2((r, c), (0.86 + j[3], 0.3), (0.14, 0.25 * k)) <= 1) & body & ~lungs
    img = np.where(lungs, 0.2 + 0.1 * r, img)
    img = np.where(liver, 0.68, img)
    img = np.where(heart, 0.76, img)
    img = ribs(img, r, c, body, j[0])
    if lesion:
        side = 0.29 if rng.random() < 0.5 else 0.71
        centre = (0.45 + j[1] + rng.uniform(-0.15, 0.0), side + rng.uniform(-0.05, 0.05))  # above the heart
        img = img + 0.5 * np.exp(-ellipsoid_r2((r, c), centre, (rng.uniform(0.05, 0.07),) * 2))
    img = img + rng.normal(0.0, 0.02, (n, n))
    label = np.zeros((n, n), np.uint8)
    label[lungs & body] = SPAD_LABELS["lung"]
    label[liver] = SPAD_LABELS["liver"]
    label[heart] = SPAD_LABELS["heart"]
    return to_uint8(img), label


# 3D tissue values (background, body, lung, heart, liver, spleen, kidney, bone, lesion): CT in HU, MR arbitrary
_TISSUE = {
    "ct": (-1000.0, 40, -850, 180, 90, 60, 150, 500, 320),
    "mr": (5.0, 220, 30, 400, 300, 250, 350, 120, 800),
}


def _volume(rng: np.random.Generator, n: int, slice_spacing: float, modality: str, lesion: bool):
    """One CT/MR-like volume (float32 ``(n, n, nz)``, axes X, Y, Z in RAS), its label map and affine."""
    nz = max(1, round(n / slice_spacing))
    x, y = (np.arange(n) - (n - 1) / 2) / (n / 2), (np.arange(n) - (n - 1) / 2) / (n / 2)
    z = (np.arange(nz) - (nz - 1) / 2) * slice_spacing / (n / 2)
    g = (x[:, None, None], y[None, :, None], z[None, None, :])  # normalised coordinates, 1 = half the extent
    j, k = rng.uniform(-0.05, 0.05, 3), rng.uniform(0.92, 1.08)
    body = np.broadcast_to(ellipsoid_r2(g[:2], (0, 0), (0.9 * k, 0.7 * k)) <= 1, (n, n, nz))
    lungs = (
        (ellipsoid_r2(g, (-0.42 + j[0], -0.05, 0.45), (0.3 * k, 0.45 * k, 0.55)) <= 1)
        | (ellipsoid_r2(g, (0.42 + j[0], -0.05, 0.45), (0.3 * k, 0.45 * k, 0.55)) <= 1)
    ) & (g[2] > 0.05 + j[2])
    heart = ellipsoid_r2(g, (-0.12 + j[1], 0.2, 0.3), (0.3 * k, 0.25 * k, 0.3)) <= 1
    liver_r2 = ellipsoid_r2(g, (0.35 + j[0], 0.05, -0.3 + j[2]), (0.45 * k, 0.45 * k, 0.45))
    liver = (liver_r2 <= 1) & ~lungs & ~heart
    spleen = ellipsoid_r2(g, (-0.5 + j[1], -0.25, -0.3), (0.18, 0.22, 0.25)) <= 1
    kidneys = (ellipsoid_r2(g, (-0.38, -0.45, -0.6), (0.14, 0.12, 0.25)) <= 1) | (
        ellipsoid_r2(g, (0.38, -0.45, -0.6), (0.14, 0.12, 0.25)) <= 1
    )
    spine = np.broadcast_to(ellipsoid_r2(g[:2], (0, -0.52), (0.12, 0.12)) <= 1, (n, n, nz))
    tissue = np.zeros((n, n, nz), np.uint8)
    for code, mask in enumerate((body, lungs, heart, liver, spleen, kidneys, spine), start=1):
        tissue[mask & body] = code
    label = np.zeros((n, n, nz), np.uint8)
    for name, code in (("lung", 2), ("heart", 3), ("liver", 4)):
        label[tissue == code] = SPAD_LABELS[name]
    values = np.asarray(_TISSUE[modality], np.float32)
    vol = values[tissue]
    if lesion:  # a sphere of radius 6-8 mm centred on a voxel deep inside the liver
        ci = random_voxel(rng, (liver_r2 <= 0.25) & (tissue == 4))
        r2 = ellipsoid_r2(g, (x[ci[0]], y[ci[1]], z[ci[2]]), (rng.uniform(6, 8) / (n / 2),) * 3)
        vol[np.broadcast_to(r2 <= 1, vol.shape)] = values[8]
    vol = vol + rng.normal(0.0, 15.0 if modality == "ct" else 10.0, vol.shape).astype(np.float32)
    return vol.astype(np.float32), label, centred_affine((n, n, nz), (1.0, 1.0, float(slice_spacing)))


def generate_synthetic_spad(
    out_dir: str,
    num_2d: int = 6,
    num_3d: int = 6,
    slice_spacings: Sequence[float] = (1.0, 2.5, 5.0),
    size_2d: int = 96,
    size_3d: int = 64,
    seed: int = 0,
    overwrite: bool = False,
) -> list[str]:
    """Write a synthetic mixed 2D/3D dataset in the :func:`build_spad_datalist` layout.

    2D: ``images/xray_<i>.png`` (8-bit grayscale, ``size_2d`` square, chest-radiograph-like) with
    ``labels/xray_<i>.png`` (uint8). 3D: ``images/{ct,mr}_<j>.nii.gz`` (float32; CT in HU for even ``j``,
    MR-like for odd ``j``), in-plane ``size_3d`` voxels of 1 mm, slice axis Z with spacing
    ``slice_spacings[j % len]`` and ``round(size_3d / spacing)`` slices, with ``labels/<same>.nii.gz`` (uint8,
    same affine). Labels: :data:`SPAD_LABELS` (module doc). ``classes.csv`` (``image,class``): 1 when a bright
    lesion is present, ``floor(n / 2)`` of each of the 2D and the 3D images, drawn from ``seed``.

    Args:
        out_dir: dataset root (created if needed).
        num_2d: number of 2D images.
        num_3d: number of 3D volumes.
        slice_spacings: slice spacings (mm) the volumes cycle through; 1, 2.5 and 5 give aniso_d 0, 1, 2.
        size_2d: side of the 2D images in pixels.
        size_3d: in-plane side of the volumes in voxels (1 mm).
        seed: random seed; the output is deterministic for a seed.
        overwrite: replace existing files instead of raising.

    Returns:
        The image names (stems) written.

    Raises:
        ValueError: invalid counts, sizes or spacings.
        FileExistsError: a file to write exists and ``overwrite`` is False.
    """
    if num_2d < 0 or num_3d < 0 or num_2d + num_3d < 1:
        raise ValueError(f"need num_2d, num_3d >= 0 and at least one image, got {num_2d}, {num_3d}.")
    if size_2d < 32 or size_3d < 32:
        raise ValueError(f"size_2d and size_3d must be at least 32, got {size_2d}, {size_3d}.")
    if not slice_spacings or min(slice_spacings) <= 0 or max(slice_spacings) > size_3d:
        raise ValueError(f"slice_spacings must be positive mm values <= size_3d, got {tuple(slice_spacings)}.")
    names_2d = [f"xray_{i:03d}" for i in range(num_2d)]
    names_3d = [f"{('ct', 'mr')[j % 2]}_{j:03d}" for j in range(num_3d)]
    files = [f"{n}.png" for n in names_2d] + [f"{n}.nii.gz" for n in names_3d]
    images_dir, labels_dir = os.path.join(out_dir, "images"), os.path.join(out_dir, "labels")
    targets = [os.path.join(d, f) for f in files for d in (images_dir, labels_dir)]
    targets.append(os.path.join(out_dir, "classes.csv"))
    if not overwrite:
        for path in targets:
            if os.path.exists(path):
                raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    os.makedirs(images_dir, exist_ok=True)
    os.makedirs(labels_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    lesions = [rng.permutation(n) < n // 2 for n in (num_2d, num_3d)]
    children = np.random.SeedSequence(seed).spawn(num_2d + num_3d)
    for i, name in enumerate(names_2d):
        img, label = _radiograph(np.random.default_rng(children[i]), int(size_2d), bool(lesions[0][i]))
        Image.fromarray(img).save(os.path.join(images_dir, f"{name}.png"))
        Image.fromarray(label).save(os.path.join(labels_dir, f"{name}.png"))
    for j, name in enumerate(names_3d):
        spacing = float(slice_spacings[j % len(slice_spacings)])
        rng_j = np.random.default_rng(children[num_2d + j])
        vol, label, affine = _volume(rng_j, int(size_3d), spacing, name[:2], bool(lesions[1][j]))
        save_nifti(vol, affine, os.path.join(images_dir, f"{name}.nii.gz"))
        save_nifti(label, affine, os.path.join(labels_dir, f"{name}.nii.gz"))
    with open(os.path.join(out_dir, "classes.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "class"])
        writer.writerows([file, int(c)] for file, c in zip(files, [*lesions[0], *lesions[1]]))
    return names_2d + names_3d


def ensure_demo_spad(dataset_dir: str, **kw: Any) -> str:
    """Return a SPAD dataset directory, generating the synthetic demo there if it does not exist.

    Same rule as :func:`medfm.data.synthetic_petct.ensure_demo_petct`: a missing ``dataset_dir`` gets the
    demo; an existing one is returned untouched when it holds images and is never written into otherwise.

    Args:
        dataset_dir: dataset root.
        **kw: arguments of :func:`generate_synthetic_spad` (``num_2d``, ``num_3d``, ``seed``, ...).

    Returns:
        ``dataset_dir``.

    Raises:
        ValueError: ``dataset_dir`` exists but holds no image under ``images/``.
    """
    if not os.path.exists(dataset_dir):
        generate_synthetic_spad(dataset_dir, **kw)
        return dataset_dir
    if not (os.path.isdir(dataset_dir) and find_spad_images(os.path.join(dataset_dir, "images"))):
        raise ValueError(
            f"{dataset_dir} exists but holds no images; refusing to generate demo data into an existing directory "
            "(a SPAD dataset has images/<name>.png|.jpg|.dcm|.nii.gz or images/<series>/*.dcm)."
        )
    return dataset_dir
