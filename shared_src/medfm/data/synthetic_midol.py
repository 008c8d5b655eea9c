"""Synthetic five-modality 2D demo data for M-IDoL, in the layout :func:`medfm.data.midol.build_image_folder_datalist`
reads.

Every image is an 8-bit RGB PNG; each modality looks different and has two balanced classes that a simple image
statistic separates:

=============  ==========================================  ================================================
modality       appearance                                  class 1 (class 0 lacks it)
=============  ==========================================  ================================================
``xray``       grey chest radiograph: dark lungs, ribs     a large bright opacity filling the lower lung
``fundus``     orange disc on black, optic disc, vessels   many bright yellow exudate spots
``oct``        grey layered retinal bands on dark          a thick (oedematous) retina: more bright rows
``dermoscopy`` skin tone with a brown lesion               a large dark lesion (class 0: small light nevus)
``pathology``  pink stroma with purple nuclei              dense nuclei (class 0: sparse)
=============  ==========================================  ================================================

Dermoscopy images have a lesion mask ``masks/dermoscopy/<name>.png`` (8-bit grey, 0 background, 255 lesion, as
the ISIC challenge masks) for the segmentation task.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from .midol import MODALITIES, find_modality_images
from .synthetic_shapes import chest_outline, ellipsoid_r2, ribs, to_uint8, unit_grid

__all__ = ["MIDOL_MASK_VALUE", "ensure_demo_midol", "generate_synthetic_midol"]

MIDOL_MASK_VALUE = 255
"""Foreground value of the demo lesion masks (background 0)."""


def _grey(v: np.ndarray) -> np.ndarray:
    """``(n, n)`` grey values to ``(n, n, 3)``."""
    return np.repeat(v[..., None], 3, axis=-1)


def _xray(rng: np.random.Generator, n: int, cls: int) -> np.ndarray:
    r, c = unit_grid((n, n))
    k = rng.uniform(0.93, 1.07)
    body, lungs, heart = chest_outline(r, c, k)
    img = np.where(body, 0.55 + 0.08 * (r - 0.5), 0.05)
    img = np.where(lungs[0] | lungs[1], 0.18 + 0.1 * r, img)
    img = np.where(heart, 0.72, img)
    img = ribs(img, r, c, body, rng.uniform(-0.02, 0.02))
    if cls:  # effusion-like opacity: the lower part of one lung turns bright
        side = int(rng.integers(2))
        level = 0.45 + rng.uniform(-0.08, 0.0)
        img = np.where(lungs[side] & (r > level), 0.7, img)
    return _grey(img + rng.normal(0, 0.02, (n, n)))


def _fundus(rng: np.random.Generator, n: int, cls: int) -> np.ndarray:
    r, c = unit_grid((n, n))
    disc = ellipsoid_r2((r, c), (0.5, 0.5), (0.47, 0.47))
    shade = np.clip(1.0 - 0.35 * disc, 0, 1)[..., None]
    img = np.where((disc <= 1)[..., None], np.array([0.85, 0.42, 0.12]) * shade, 0.0)
    od = (0.5 + rng.uniform(-0.05, 0.05), 0.72 + rng.uniform(-0.04, 0.04))
    img = np.where((ellipsoid_r2((r, c), od, (0.08, 0.08)) <= 1)[..., None], np.array([0.98, 0.86, 0.55]), img)
    t = np.linspace(0, 1, 80)[:, None]
    pts = []
    for angle in rng.uniform(0, 2 * np.pi, 6):  # vessels: wavy curves leaving the optic disc
        a = angle + 0.5 * np.sin(3 * np.pi * t + rng.uniform(0, 2 * np.pi)) * t
        pts.append(np.concatenate([od[0] + 0.4 * t * np.sin(a), od[1] + 0.4 * t * np.cos(a)], axis=1))
    p = np.concatenate(pts)
    d2 = (r[..., None] - p[:, 0]) ** 2 + (c[..., None] - p[:, 1]) ** 2
    vessel = (d2.min(axis=-1) < 0.009**2) & (disc <= 1)
    img = np.where(vessel[..., None], np.array([0.5, 0.1, 0.05]), img)
    if cls:  # exudates: bright yellow spots on the retina
        for _ in range(12):
            rad, ang = np.sqrt(rng.uniform(0.0, 0.3**2)), rng.uniform(0, 2 * np.pi)
            spot = ellipsoid_r2((r, c), (0.5 + rad * np.sin(ang), 0.45 + rad * np.cos(ang)), (0.028, 0.028)) <= 1
            img = np.where(spot[..., None], np.array([0.97, 0.92, 0.45]), img)
    return img + rng.normal(0, 0.015, (n, n, 3))


def _oct(rng: np.random.Generator, n: int, cls: int) -> np.ndarray:
    r, c = unit_grid((n, n))
    top = 0.3 + 0.05 * np.sin(2 * np.pi * (c + rng.uniform(0, 1))) + rng.uniform(-0.03, 0.03)
    thick = rng.uniform(0.38, 0.44) if cls else rng.uniform(0.2, 0.24)
    depth = (r - top) / thick  # 0 at the inner surface, 1 at the pigment epithelium
    bands = 0.45 + 0.2 * np.cos(6 * np.pi * depth)  # alternating bright and dark layers
    img = np.where((depth >= 0) & (depth <= 1), bands, 0.06)
    img = np.where((depth > 1) & (depth < 1.12), 0.85, img)  # bright RPE line below the retina
    speckle = rng.gamma(4.0, 0.25, (n, n))
    return _grey(img * speckle)


def _dermoscopy(rng: np.random.Generator, n: int, cls: int) -> tuple[np.ndarray, np.ndarray]:
    r, c = unit_grid((n, n))
    skin = np.array([0.88, 0.68, 0.56]) + rng.uniform(-0.04, 0.04, 3)
    img = skin * (1 - 0.08 * (ellipsoid_r2((r, c), (0.5, 0.5), (0.7, 0.7))))[..., None]
    centre = tuple(0.5 + rng.uniform(-0.08, 0.08, 2))
    semi = rng.uniform(0.26, 0.32, 2) if cls else rng.uniform(0.1, 0.14, 2)
    angle = np.arctan2(r - centre[0], c - centre[1])
    wobble = 1 + 0.12 * np.sin(3 * angle + rng.uniform(0, 2 * np.pi))  # irregular border
    lesion = ellipsoid_r2((r, c), centre, tuple(semi)) <= wobble**2
    colour = np.array([0.28, 0.16, 0.1]) if cls else np.array([0.62, 0.42, 0.3])
    img = np.where(lesion[..., None], colour + 0.05 * rng.standard_normal((n, n, 1)), img)
    return img + rng.normal(0, 0.015, (n, n, 3)), lesion


def _pathology(rng: np.random.Generator, n: int, cls: int) -> np.ndarray:
    r, c = unit_grid((n, n))
    stroma = np.array([0.93, 0.68, 0.82]) + 0.04 * np.sin(8 * np.pi * (r + 0.5 * c + rng.uniform(0, 1)))[..., None]
    nuclei = np.zeros((n, n), bool)
    for _ in range(rng.integers(70, 90) if cls else rng.integers(12, 20)):
        centre = tuple(rng.uniform(0, 1, 2))
        semi = tuple(rng.uniform(0.025, 0.04, 2))
        nuclei |= ellipsoid_r2((r, c), centre, semi) <= 1
    img = np.where(nuclei[..., None], np.array([0.38, 0.2, 0.55]), stroma)
    return img + rng.normal(0, 0.02, (n, n, 3))


_DRAW: dict[str, Callable[..., Any]] = {
    "xray": _xray,
    "fundus": _fundus,
    "oct": _oct,
    "dermoscopy": _dermoscopy,
    "pathology": _pathology,
}


def generate_synthetic_midol(
    out_dir: str, per_modality: int = 8, size: int = 96, seed: int = 0, overwrite: bool = False
) -> list[str]:
    """Write a synthetic five-modality dataset in the :func:`build_image_folder_datalist` layout.

    Writes ``<out_dir>/<modality>/<prefix>_<i>.png`` (8-bit RGB, ``size`` square) for each of
    :data:`medfm.data.midol.MODALITIES`, ``masks/dermoscopy/<name>.png`` (8-bit grey, 0 / :data:`MIDOL_MASK_VALUE`)
    for each dermoscopy image, and ``classes.csv`` (``image,class``, paths relative to ``out_dir``) with
    ``per_modality // 2`` images of class 1 per modality, drawn from ``seed`` (appearance and classes: module doc).

    Args:
        out_dir: dataset root (created if needed).
        per_modality: images per modality.
        size: image side in pixels.
        seed: random seed; the output is deterministic for a seed.
        overwrite: replace existing files instead of raising.

    Returns:
        The image paths written, relative to ``out_dir``.

    Raises:
        ValueError: ``per_modality < 1`` or ``size < 32``.
        FileExistsError: a file to write exists and ``overwrite`` is False.
    """
    if int(per_modality) < 1:
        raise ValueError(f"per_modality must be at least 1, got {per_modality}.")
    if int(size) < 32:
        raise ValueError(f"size must be at least 32, got {size}.")
    per_modality, size = int(per_modality), int(size)
    prefix = {"xray": "xray", "fundus": "fundus", "oct": "oct", "dermoscopy": "derm", "pathology": "path"}
    names = [(m, f"{prefix[m]}_{i:03d}") for m in MODALITIES for i in range(per_modality)]
    images = [os.path.join(m, f"{name}.png") for m, name in names]
    masks = [os.path.join("masks", m, f"{name}.png") for m, name in names if m == "dermoscopy"]
    if not overwrite:
        for rel in [*images, *masks, "classes.csv"]:
            if os.path.exists(os.path.join(out_dir, rel)):
                raise FileExistsError(
                    f"{os.path.join(out_dir, rel)} already exists; pass overwrite=True to replace it."
                )
    for m in MODALITIES:
        os.makedirs(os.path.join(out_dir, m), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "masks", "dermoscopy"), exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = {m: (rng.permutation(per_modality) < per_modality // 2).astype(int) for m in MODALITIES}
    children = np.random.SeedSequence(seed).spawn(len(names))
    rows = []
    for k, ((m, name), rel) in enumerate(zip(names, images)):
        cls = int(classes[m][k % per_modality])
        out = _DRAW[m](np.random.default_rng(children[k]), size, cls)
        if m == "dermoscopy":
            out, lesion = out
            mask = (lesion * MIDOL_MASK_VALUE).astype(np.uint8)
            Image.fromarray(mask).save(os.path.join(out_dir, "masks", m, f"{name}.png"))
        Image.fromarray(to_uint8(out), mode="RGB").save(os.path.join(out_dir, rel))
        rows.append([rel.replace(os.sep, "/"), cls])
    with open(os.path.join(out_dir, "classes.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "class"])
        writer.writerows(rows)
    return images


def ensure_demo_midol(dataset_dir: str, **kw: Any) -> str:
    """Return an M-IDoL dataset directory, generating the synthetic demo there if it does not exist.

    Same rule as :func:`medfm.data.synthetic_spad.ensure_demo_spad`: a missing ``dataset_dir`` gets the demo; an
    existing one is returned untouched when it holds images and is never written into otherwise.

    Args:
        dataset_dir: dataset root.
        **kw: arguments of :func:`generate_synthetic_midol` (``per_modality``, ``size``, ``seed``, ...).

    Returns:
        ``dataset_dir``.

    Raises:
        ValueError: ``dataset_dir`` exists but holds no image in any ``<modality>/`` folder.
    """
    if not os.path.exists(dataset_dir):
        generate_synthetic_midol(dataset_dir, **kw)
        return dataset_dir
    if not (
        os.path.isdir(dataset_dir) and any(find_modality_images(os.path.join(dataset_dir, m))[0] for m in MODALITIES)
    ):
        raise ValueError(
            f"{dataset_dir} exists but holds no images; refusing to generate demo data into an existing directory "
            f"(an M-IDoL dataset has <modality>/<name>.png|.jpg|.jpeg|.dcm with modality one of {MODALITIES})."
        )
    return dataset_dir
