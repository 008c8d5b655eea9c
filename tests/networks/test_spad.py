"""SPAD convolutions, 3D RoPE: properties against independent computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from medfm.networks.blocks.rope import Rope3D, apply_rope, rope_frequencies
from medfm.networks.blocks.spad import (
    MAX_ANISO_D,
    SpadConv3d,
    SpadConvTranspose3d,
    SpadDownsample,
    SpadSequential,
    SpadUpsample,
    aniso_d_from_spacing,
    inflate_2d_weight,
    reduce_depth,
)


@pytest.mark.parametrize(
    "ratio, expected", [(1, 0), (2, 1), (3.9, 1), (4, 2), (16, 4), (40, 5), (0.5, 0), (31.9, 4), (32, 5)]
)
def test_aniso_d_table(ratio, expected):
    # independent: floor(log2(clip(ratio, 1, 32)))
    assert expected == int(math.floor(math.log2(min(max(ratio, 1), 32))))
    assert aniso_d_from_spacing((ratio * 0.7, 0.7, 0.9)) == expected


def test_aniso_d_2d_and_errors():
    assert aniso_d_from_spacing(None) == MAX_ANISO_D
    assert aniso_d_from_spacing((0.3, 0.3)) == MAX_ANISO_D
    with pytest.raises(ValueError, match="positive"):
        aniso_d_from_spacing((0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="2 .* or 3"):
        aniso_d_from_spacing((1.0,))


def test_patch_conv_on_2d_equals_full_conv_on_depth_repeated_image():
    torch.manual_seed(0)
    conv = SpadConv3d(3, 5, 16, stride=16)
    img = torch.randn(2, 3, 1, 32, 48)
    spad = conv(img, aniso_d=5)
    full = F.conv3d(img.expand(-1, -1, 16, -1, -1), conv.weight, conv.bias, stride=16)
    assert spad.shape == full.shape == (2, 5, 1, 2, 3)
    torch.testing.assert_close(spad, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aniso_d", [1, 2, 3])
def test_patch_conv_partial_depth_equals_full_conv_on_upsampled_volume(aniso_d):
    torch.manual_seed(aniso_d)
    conv = SpadConv3d(2, 4, 16, stride=16)
    depth_patch = 16 >> aniso_d
    vol = torch.randn(1, 2, 2 * depth_patch, 32, 32)
    spad = conv(vol, aniso_d=aniso_d)
    # repeat every slice 2**aniso_d times: the volume resampled to isotropic voxels
    full = F.conv3d(vol.repeat_interleave(1 << aniso_d, dim=2), conv.weight, conv.bias, stride=16)
    assert spad.shape == full.shape == (1, 4, 2, 2, 2)
    torch.testing.assert_close(spad, full, atol=1e-5, rtol=1e-5)


def test_3x3_conv_on_2d_equals_interior_slice_of_full_conv():
    torch.manual_seed(1)
    conv = SpadConv3d(3, 4, 3, padding=1)
    img = torch.randn(1, 3, 1, 16, 16)
    spad = conv(img, aniso_d=5)
    full = conv(img.expand(-1, -1, 7, -1, -1), aniso_d=0)  # isotropic: the plain 3D conv
    assert spad.shape == (1, 4, 1, 16, 16)
    torch.testing.assert_close(spad[:, :, 0], full[:, :, 3], atol=1e-5, rtol=1e-5)


def test_isotropic_input_is_the_plain_conv():
    torch.manual_seed(2)
    conv = SpadConv3d(2, 3, 3, stride=2, padding=1)
    x = torch.randn(1, 2, 8, 8, 8)
    torch.testing.assert_close(conv(x, 0), F.conv3d(x, conv.weight, conv.bias, 2, 1))


def test_depth_stride_schedule_through_a_stack():
    """H, W halve every stage; D halves only once the level reaches aniso_d."""
    net = SpadSequential(*[SpadConv3d(1, 1, 3, stride=2, padding=1) for _ in range(5)])
    assert net.level_change == 5
    for aniso_d in range(6):
        d = 32
        shapes = []
        x = torch.zeros(1, 1, d, 64, 64)
        for level, layer in enumerate(net):
            x = layer(x, aniso_d, level)
            shapes.append(x.shape[2])
        expected = [d >> max(0, lvl + 1 - aniso_d) for lvl in range(5)]
        assert shapes == expected, (aniso_d, shapes)


def test_transposed_conv_mirrors_and_sums():
    torch.manual_seed(3)
    up = SpadConvTranspose3d(3, 2, 2)
    x = torch.randn(1, 3, 1, 4, 4)
    # still anisotropic at this level: depth kept, kernel summed over depth
    y = up(x, aniso_d=5, level=3)
    ref = F.conv_transpose3d(x, up.weight.sum(2, keepdim=True), up.bias, (1, 2, 2))
    assert y.shape == (1, 2, 1, 8, 8)
    torch.testing.assert_close(y, ref)
    # depth was downsampled before: full transposed conv
    assert up(torch.randn(1, 3, 2, 4, 4), aniso_d=0, level=3).shape == (1, 2, 4, 8, 8)


def test_interpolation_down_up_follow_the_rule():
    down, upm = SpadDownsample(), SpadUpsample()
    x = torch.randn(1, 1, 4, 8, 8)
    assert down(x, aniso_d=2, level=1).shape == (1, 1, 4, 4, 4)
    assert down(x, aniso_d=2, level=2).shape == (1, 1, 2, 4, 4)
    assert upm(x, aniso_d=2, level=2).shape == (1, 1, 4, 16, 16)
    assert upm(x, aniso_d=2, level=3).shape == (1, 1, 8, 16, 16)


def test_weight_inflation_keeps_the_2d_function():
    torch.manual_seed(4)
    w2d = torch.randn(4, 3, 3, 3)
    conv3d = SpadConv3d(3, 4, 3, padding=1)
    state = {"weight": w2d, "bias": torch.zeros(4)}
    conv3d.load_state_dict(state)
    assert conv3d.weight.shape == (4, 3, 3, 3, 3)
    torch.testing.assert_close(reduce_depth(inflate_2d_weight(w2d, 3), 1)[:, :, 0], w2d)
    img = torch.randn(1, 3, 10, 10)
    torch.testing.assert_close(
        conv3d(img[:, :, None], aniso_d=5)[:, :, 0], F.conv2d(img, w2d, padding=1), atol=1e-5, rtol=1e-5
    )


def test_bad_conv_geometry_is_refused():
    with pytest.raises(ValueError, match="power-of-two"):
        SpadConv3d(1, 1, 3, stride=3, padding=1)
    with pytest.raises(ValueError, match="depth kernel"):
        SpadConv3d(1, 1, 4, stride=2, padding=1)


# ---------------------------------------------------------------- RoPE


def _rotation_matrix(theta: torch.Tensor) -> torch.Tensor:
    """Block-diagonal 2x2 rotations, built independently of apply_rope."""
    n = theta.numel()
    r = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
    for j, t in enumerate(theta.tolist()):
        c, s = math.cos(t), math.sin(t)
        r[2 * j : 2 * j + 2, 2 * j : 2 * j + 2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return r


def test_rope_frequencies_are_the_papers():
    w_z, w_xy = rope_frequencies(64)
    k = torch.arange(16, dtype=torch.float64)
    torch.testing.assert_close(w_xy, 10000.0 ** (-2 * k / 32))
    torch.testing.assert_close(w_z, 2333.0 ** (-(2 * k + 1) / 32))


def test_rope_matches_rotation_matrices_and_is_2d_rope_at_z0():
    rope = Rope3D(16)
    pos = torch.tensor([[0, 3, 5], [2, 1, 4]])
    theta = rope.angles(pos)
    w_z, w_xy = rope_frequencies(16)
    # z = 0: in-plane pairs only (EVA-02 2D RoPE: first half by y, second half by x)
    torch.testing.assert_close(theta[0], torch.cat((3 * w_xy, 5 * w_xy)))
    torch.testing.assert_close(theta[1], torch.cat((2 * w_z + 1 * w_xy, 2 * w_z + 4 * w_xy)))
    x = torch.randn(2, 16, dtype=torch.float64)
    out = apply_rope(x, theta.cos(), theta.sin())
    for i in range(2):
        torch.testing.assert_close(out[i], _rotation_matrix(theta[i]) @ x[i])


def test_rope_score_depends_only_on_offset():
    torch.manual_seed(5)
    rope = Rope3D(32)
    q, k = torch.randn(32, dtype=torch.float64), torch.randn(32, dtype=torch.float64)

    def score(pa, pb):
        t = rope.angles(torch.tensor([pa, pb]))
        rq = apply_rope(q[None], t[:1].cos(), t[:1].sin())[0]
        rk = apply_rope(k[None], t[1:].cos(), t[1:].sin())[0]
        return float(rq @ rk)

    for pa, pb, shift in [((0, 0, 0), (1, 2, 3), (4, 1, 7)), ((3, 5, 1), (0, 0, 9), (-2, 6, 2))]:
        moved = score(tuple(a + s for a, s in zip(pa, shift)), tuple(b + s for b, s in zip(pb, shift)))
        assert abs(score(pa, pb) - moved) < 1e-9


def test_rope_distinct_offsets_give_distinct_rotations():
    """Theorem 1 on a grid: every distinct integer offset (dz, dy, dx) gives a distinct rotation."""
    rope = Rope3D(64)
    d, h, w = 4, 6, 6
    offsets = torch.tensor(
        list(itertools.product(range(-d + 1, d), range(-h + 1, h), range(-w + 1, w))), dtype=torch.float64
    )
    theta = rope.angles(offsets)
    # compare rotations on the circle (cos, sin), not raw angles: equal modulo 2*pi would be equal rotations
    emb = torch.cat((theta.cos(), theta.sin()), dim=1)
    dist = torch.cdist(emb, emb)
    dist.fill_diagonal_(float("inf"))
    assert len(offsets) == 7 * 11 * 11
    assert float(dist.min()) > 1e-3


def test_rope_table_follows_the_grid_order():
    rope = Rope3D(8)
    cos, sin = rope((2, 3, 4))
    pos = torch.tensor(list(itertools.product(range(2), range(3), range(4))))
    torch.testing.assert_close(cos, rope.angles(pos).cos().float())
    torch.testing.assert_close(sin, rope.angles(pos).sin().float())
