"""The drawing helpers of the synthetic demos against hand computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medfm.data.synthetic_shapes import (
    axes_grid,
    centred_affine,
    chest_outline,
    ellipsoid_r2,
    random_voxel,
    ribs,
    smooth_field,
    soft_ellipsoid,
    to_uint8,
    unit_grid,
)


def test_ellipsoid_r2_equals_a_loop_over_voxels():
    axes = [np.linspace(-1, 1, 5), np.linspace(0, 2, 4), np.linspace(-3, 3, 3)]
    centre, semi = (0.2, 1.0, -0.5), (0.7, 1.5, 2.0)
    r2 = ellipsoid_r2(axes_grid(axes), centre, semi)
    assert r2.shape == (5, 4, 3)
    for i, j, k in itertools.product(range(5), range(4), range(3)):
        point = (axes[0][i], axes[1][j], axes[2][k])
        want = sum(((p - c) / s) ** 2 for p, c, s in zip(point, centre, semi))
        assert r2[i, j, k] == pytest.approx(want, rel=1e-12)


def test_unit_grid_is_linspace_along_each_axis():
    r, c = unit_grid((4, 3))
    assert r.shape == (4, 1) and c.shape == (1, 3)
    assert np.array_equal(r[:, 0], [0, 1 / 3, 2 / 3, 1]) and np.array_equal(c[0], [0, 0.5, 1])
    g = unit_grid((2, 3, 5), -1.0, 1.0, np.float32)
    assert [x.shape for x in g] == [(2, 1, 1), (1, 3, 1), (1, 1, 5)] and g[2].dtype == np.float32
    assert g[2].ravel().tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]


def test_soft_ellipsoid_is_one_inside_half_on_the_surface_zero_outside():
    g = unit_grid((41, 41, 41), -1.0, 1.0, np.float32)
    m = soft_ellipsoid(g, (0, 0, 0), (0.5, 0.5, 0.5))
    assert m.dtype == np.float32 and m.shape == (41, 41, 41)
    assert m[20, 20, 20] > 0.999 and m[0, 0, 0] < 1e-3
    assert m[30, 20, 20] == pytest.approx(0.5, abs=1e-6)  # x = 0.5: on the surface, r = 1


def test_smooth_field_is_standardised_and_smooth():
    f = smooth_field(np.random.default_rng(0), (16, 12, 8), cells=4)
    assert f.dtype == np.float32 and f.shape == (16, 12, 8)
    assert abs(float(f.mean())) < 1e-5 and float(f.std()) == pytest.approx(1.0, abs=1e-4)
    # neighbours differ far less than independent noise of unit variance would (about sqrt(2))
    assert float(np.abs(np.diff(f, axis=0)).mean()) < 0.5


def test_random_voxel_draws_a_voxel_of_the_mask_as_choice_does():
    mask = np.zeros((4, 5, 6), bool)
    mask[1, 2, 3] = mask[3, 0, 5] = True
    draws = {tuple(int(i) for i in random_voxel(np.random.default_rng(s), mask)) for s in range(20)}
    assert draws == {(1, 2, 3), (3, 0, 5)}
    flat = np.random.default_rng(7).choice(np.flatnonzero(mask))
    assert np.ravel_multi_index(random_voxel(np.random.default_rng(7), mask), mask.shape) == flat


def test_centred_affine_maps_the_array_centre_to_the_origin():
    aff = centred_affine((5, 4, 3), (2.0, 1.0, 3.0))
    assert np.allclose(np.diag(aff), [2.0, 1.0, 3.0, 1.0])
    assert np.allclose(aff @ [2.0, 1.5, 1.0, 1.0], [0, 0, 0, 1])


def test_to_uint8_rounds_and_clips():
    assert to_uint8(np.array([-0.5, 0.0, 0.5, 1.0, 2.0])).tolist() == [0, 0, 128, 255, 255]


def test_chest_outline_and_ribs():
    r, c = unit_grid((64, 64))
    body, (left, right), heart = chest_outline(r, c, 1.0)
    assert left[int(0.45 * 63), int(0.29 * 63)] and right[int(0.45 * 63), int(0.71 * 63)]
    assert heart[int(0.63 * 63), int(0.57 * 63)] and not (left & right).any()
    assert not (left | right)[~body].any()  # the lungs lie inside the body
    img = ribs(np.zeros((64, 64)), r, c, body, 0.0)
    assert set(np.unique(img).round(6)) <= {0.0, 0.1, 0.2} and (img > 0).any() and not img[~body].any()
    assert not img[r[:, 0] >= 0.8].any()  # no rib below row 0.8
