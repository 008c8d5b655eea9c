"""SwinBackbone: shapes, and window attention / shifted-window mask / bias index / patch merging checked against
naive re-implementations of Microsoft's Swin written here with explicit loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medfm.networks.blocks.swin import (
    PatchMerging,
    SwinBackbone,
    SwinBlock,
    relative_position_index,
    shifted_window_mask,
)

TINY = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4)}


def _naive_index(ws: int) -> torch.Tensor:
    coords = [(y, x) for y in range(ws) for x in range(ws)]
    out = torch.zeros(len(coords), len(coords), dtype=torch.long)
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            out[i, j] = (yi - yj + ws - 1) * (2 * ws - 1) + (xi - xj + ws - 1)
    return out


def _naive_region_labels(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """Microsoft's img_mask: labels of the 3 x 3 slices of the (already shifted) map."""
    img = torch.zeros(h, w)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[hs, wsl] = cnt
            cnt += 1
    return img


def _naive_block(blk: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """One Swin block, window by window and head by head, softmax written out; x: (B, H, W, C)."""
    b, h, w, c = x.shape
    ws, s, attn = blk.window_size, blk.shift, blk.attn
    heads, d = attn.num_heads, c // attn.num_heads
    y = blk.norm1(x)
    y = F.pad(y, (0, 0, 0, (-w) % ws, 0, (-h) % ws))
    hp, wp = y.shape[1:3]
    if s:
        y = torch.roll(y, (-s, -s), (1, 2))
    labels = _naive_region_labels(hp, wp, ws, s) if s else torch.zeros(hp, wp)
    table, index = attn.relative_position_bias_table, _naive_index(ws)
    out = torch.zeros_like(y)
    for wy in range(0, hp, ws):
        for wx in range(0, wp, ws):
            tok = y[:, wy : wy + ws, wx : wx + ws].reshape(b, ws * ws, c)
            lab = labels[wy : wy + ws, wx : wx + ws].reshape(-1)
            q, k, v = attn.qkv(tok).chunk(3, dim=-1)
            heads_out = []
            for hd in range(heads):
                sl = slice(hd * d, (hd + 1) * d)
                logits = q[..., sl] @ k[..., sl].transpose(1, 2) * d**-0.5
                logits = logits + table[index, hd] + (lab[:, None] != lab[None, :]).float() * -100.0
                heads_out.append(logits.softmax(-1) @ v[..., sl])
            out[:, wy : wy + ws, wx : wx + ws] = attn.proj(torch.cat(heads_out, -1)).reshape(b, ws, ws, c)
    if s:
        out = torch.roll(out, (s, s), (1, 2))
    x = x + out[:, :h, :w]
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("ws", [2, 3, 7])
def test_relative_position_index_matches_the_formula(ws):
    assert torch.equal(relative_position_index(ws), _naive_index(ws))


@pytest.mark.parametrize("h,w,ws,shift", [(8, 8, 4, 2), (12, 8, 4, 1), (14, 14, 7, 3)])
def test_shifted_window_mask_matches_microsofts_slices(h, w, ws, shift):
    labels = _naive_region_labels(h, w, ws, shift)
    mask = shifted_window_mask(h, w, ws, shift)
    assert mask.shape == ((h // ws) * (w // ws), ws * ws, ws * ws)
    n = 0
    for wy in range(0, h, ws):
        for wx in range(0, w, ws):
            lab = labels[wy : wy + ws, wx : wx + ws].reshape(-1)
            torch.testing.assert_close(mask[n], (lab[:, None] != lab[None, :]).float() * -100.0)
            n += 1
    assert (mask[0] == 0).all()  # the top-left window never crosses a region
    assert (mask[-1] != 0).any()  # the bottom-right window mixes regions


def test_patch_merging_concatenates_in_microsofts_order():
    torch.manual_seed(0)
    pm = PatchMerging(3)
    x = torch.randn(2, 4, 6, 3)
    x0, x1, x2, x3 = x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    expected = pm.reduction(pm.norm(torch.cat([x0, x1, x2, x3], -1)))
    torch.testing.assert_close(pm(x), expected)
    assert pm(x).shape == (2, 2, 3, 6)


@pytest.mark.parametrize("size,shift", [(8, 0), (8, 2), (6, 2), (6, 0)])
def test_block_matches_a_naive_window_by_window_computation(size, shift):
    torch.manual_seed(0)
    blk = SwinBlock(dim=8, num_heads=2, window_size=4, shift=shift).eval()
    with torch.no_grad():
        blk.attn.relative_position_bias_table.normal_()  # make the bias matter
    x = torch.randn(2, size, size, 8)
    hp = size + (-size) % 4
    mask = shifted_window_mask(hp, hp, 4, shift) if shift else None
    with torch.no_grad():
        torch.testing.assert_close(blk(x, mask), _naive_block(blk, x), atol=1e-5, rtol=1e-5)


def test_backbone_shapes_and_stage_features():
    m = SwinBackbone(**TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 16), (2, 32, 8, 8)]
    assert m.num_features == 32
    out = m(x)
    assert out.shape == (2, 32)
    torch.testing.assert_close(out, feats[-1].mean((2, 3)))
    # the last map is normalised over channels: zero mean per position (LayerNorm with its initial affine)
    torch.testing.assert_close(feats[-1].mean(1), torch.zeros(2, 8, 8), atol=1e-5, rtol=0)
    assert "layers.1.downsample.reduction.weight" not in m.state_dict()  # no merging after the last stage


def test_backbone_equals_chained_naive_blocks():
    torch.manual_seed(1)
    m = SwinBackbone(**TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        t = m.patch_embed.norm(m.patch_embed.proj(x).permute(0, 2, 3, 1))
        for i, layer in enumerate(m.layers):
            for blk in layer.blocks:
                t = _naive_block(blk, t)
            stage = t
            if i < len(m.layers) - 1:
                t = layer.downsample(t)
        expected = m.norm(stage).mean((1, 2))
        torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)


def test_swin_b_geometry():
    m = SwinBackbone(depths=(2, 2, 2, 2))  # Swin-B widths, shorter stage 3 for speed
    assert m.num_features == 1024
    assert [layer.window_size for layer in m.layers] == [7, 7, 7, 7]
    assert [layer.shift for layer in m.layers] == [3, 3, 3, 0]  # stage 4 (7 x 7) is a single unshifted window
    sd = m.state_dict()
    assert sd["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (169, 4)
    assert sd["layers.2.downsample.reduction.weight"].shape == (1024, 2048)
    assert not any(k.endswith(("relative_position_index", "attn_mask")) for k in sd)


def test_window_shrinks_to_small_stage_resolution():
    m = SwinBackbone(img_size=32, patch_size=4, window_size=4, embed_dim=8, depths=(1, 2, 2), num_heads=(1, 2, 2))
    assert [(layer.window_size, layer.shift) for layer in m.layers] == [(4, 2), (4, 0), (2, 0)]
    assert m.layers[2].blocks[0].attn.relative_position_bias_table.shape == (9, 2)


def test_other_input_sizes_are_padded_to_whole_windows():
    m = SwinBackbone(**TINY).eval()
    feats = m.forward_features(torch.randn(1, 3, 40, 24))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 20, 12), (1, 32, 10, 6)]
    assert torch.isfinite(feats[-1]).all()


def test_every_parameter_gets_a_gradient_and_no_weight_decay():
    m = SwinBackbone(**TINY)
    m(torch.randn(2, 3, 32, 32)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    assert m.no_weight_decay() == {
        f"layers.{i}.blocks.{j}.attn.relative_position_bias_table" for i in (0, 1) for j in (0, 1)
    }


def test_bf16_autocast_forward_on_cpu():
    m = SwinBackbone(**TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 32) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"img_size": 30},  # not a multiple of patch * 2**(stages-1)
        {"depths": (2, 2, 2)},  # lengths differ
        {"num_heads": (3, 4)},  # 16 not divisible by 3
        {"drop_path_rate": 1.0},
        {"depths": (0, 2)},
    ],
)
def test_ill_arg(kwargs):
    with pytest.raises(ValueError):
        SwinBackbone(**{**TINY, **kwargs})


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (1, 3, 30, 32), (3, 32, 32)])
def test_bad_input_is_a_clear_error(shape):
    with pytest.raises(ValueError, match="expected|multiples"):
        SwinBackbone(**TINY)(torch.randn(*shape))
