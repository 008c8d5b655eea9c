"""Drawing helpers shared by the synthetic demo generators (PET/CT, SPAD, Pan-FM, M-IDoL): coordinate grids,
ellipses and ellipsoids (hard and soft), smooth random fields, a chest-radiograph outline, and the conversions
to files (8-bit images, centred affines).

Every helper is deterministic given its inputs and draws nothing from a generator it is not handed, so a
generator's output depends only on its own random stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import expit

__all__ = [
    "axes_grid",
    "centred_affine",
    "chest_outline",
    "ellipsoid_r2",
    "random_voxel",
    "ribs",
    "smooth_field",
    "soft_ellipsoid",
    "to_uint8",
    "unit_grid",
]


def axes_grid(axes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Broadcastable grids from 1D coordinate axes: entry ``a`` holds ``axes[a]`` along axis ``a`` and has size 1
    on the others."""
    return [np.asarray(x).reshape([-1 if i == a else 1 for i in range(len(axes))]) for a, x in enumerate(axes)]


def unit_grid(shape: Sequence[int], low: float = 0.0, high: float = 1.0, dtype: Any = None) -> list[np.ndarray]:
    """Broadcastable coordinates from ``low`` to ``high`` along each axis of ``shape`` (``np.linspace`` in
    ``dtype``, float64 by default), see :func:`axes_grid`."""
    return axes_grid([np.linspace(low, high, n, dtype=dtype) for n in shape])


def ellipsoid_r2(grids: Sequence[np.ndarray], centre: Sequence[Any], semi: Sequence[Any]) -> np.ndarray:
    """Normalised squared radius ``sum(((g - c) / s) ** 2)`` of an axis-aligned ellipse / ellipsoid on
    broadcastable coordinate grids (<= 1 inside). Centres and semi-axes may be arrays that broadcast with the
    grids (e.g. one ellipse per slice)."""
    return sum(((g - c) / s) ** 2 for g, c, s in zip(grids, centre, semi))


def soft_ellipsoid(grids: Sequence[np.ndarray], centre: Sequence[float], semi: Sequence[float]) -> np.ndarray:
    """Soft ellipsoid mask in ``[0, 1]`` (float32) with an edge about one voxel wide, whatever the grid size."""
    r = np.sqrt(ellipsoid_r2(grids, centre, semi))
    sharp = 2.0 * min(x.size * s for x, s in zip(grids, semi))
    return expit((1.0 - r) * sharp).astype(np.float32)


def _lerp_matrix(n: int, cells: int) -> np.ndarray:
    """``(n, cells)`` weights of linear interpolation from ``cells`` lattice points spanning ``n`` samples."""
    pos = np.linspace(0, cells - 1, n)
    lo = np.minimum(pos.astype(int), cells - 2)
    w = np.zeros((n, cells), np.float32)
    w[np.arange(n), lo] = 1 - (pos - lo)
    w[np.arange(n), lo + 1] = pos - lo
    return w


def smooth_field(rng: np.random.Generator, shape: Sequence[int], cells: int = 4) -> np.ndarray:
    """Smooth 3D random field of zero mean and unit standard deviation (float32): trilinear upsampling of a
    ``cells**3`` lattice of normal draws."""
    wx, wy, wz = (_lerp_matrix(n, cells) for n in shape)
    f = rng.standard_normal((cells,) * 3).astype(np.float32)
    f = np.einsum("kc,ijc->ijk", wz, np.einsum("jb,ibc->ijc", wy, np.einsum("ia,abc->ibc", wx, f)))
    return ((f - f.mean()) / (f.std() + 1e-6)).astype(np.float32)


def chest_outline(
    r: np.ndarray, c: np.ndarray, k: float, lung_row: float = 0.45, heart_row: float = 0.63
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Masks of a frontal chest radiograph on rows ``r`` / columns ``c`` in ``[0, 1]`` (``unit_grid``), scaled by
    ``k``: the body, the two lungs (image left, image right) at row ``lung_row`` and the heart at ``heart_row``,
    left of the image centre."""
    body = ellipsoid_r2((r, c), (0.55, 0.5), (0.6 * k, 0.46 * k)) <= 1
    lungs = tuple(ellipsoid_r2((r, c), (lung_row, side), (0.27 * k, 0.13 * k)) <= 1 for side in (0.29, 0.71))
    heart = ellipsoid_r2((r, c), (heart_row, 0.57), (0.14 * k, 0.13 * k)) <= 1
    return body, lungs, heart


def ribs(img: np.ndarray, r: np.ndarray, c: np.ndarray, body: np.ndarray, offset: float) -> np.ndarray:
    """``img`` with seven curved bright rib bands (+0.1) over the thorax, the first at row ``0.2 + offset``."""
    for y in 0.2 + 0.085 * np.arange(7) + offset:
        img = img + 0.1 * ((np.abs(r - y - 0.25 * (c - 0.5) ** 2) < 0.012) & body & (r < 0.8))
    return img


def random_voxel(rng: np.random.Generator, mask: np.ndarray) -> tuple[np.intp, ...]:
    """Index of a voxel of ``mask`` drawn uniformly from ``rng`` (``mask`` must hold one)."""
    return np.unravel_index(rng.choice(np.flatnonzero(mask)), mask.shape)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Intensities in ``[0, 1]`` to 8-bit values (rounded, clipped)."""
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)


def centred_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """``diag(spacing)`` with the array centre at the world origin, ``(4, 4)``."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * s for n, s in zip(shape, spacing)]
    return affine
