"""Encoder sizes by name: ``resolve_size`` and the ``size`` argument of the four encoder families, each checked
against the same encoder built from the size keywords written out by hand."""

from __future__ import annotations

import pytest
import torch

from medfm.networks.blocks import SPAD_VIT_SIZES, SWIN_SIZES, VIT_SIZES, SwinBackbone, ViTEncoder, resolve_size
from medfm.networks.nets import PanFMEncoder, SpadViT

VIT_KEYS = ("hidden_size", "num_layers", "num_heads", "mlp_dim")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


def test_resolve_size_takes_the_preset_and_lets_given_keywords_win():
    presets = {"s": {"a": 1, "b": 2}}
    assert resolve_size(presets, "s", a=None, b=None) == {"a": 1, "b": 2}
    assert resolve_size(presets, "s", a=5, b=None) == {"a": 5, "b": 2}
    assert resolve_size(presets, {"a": 3, "b": 4}, a=None, b=7) == {"a": 3, "b": 7}


@pytest.mark.parametrize(
    "size,match",
    [("huge", "unknown size 'huge'"), ({"a": 1}, "missing \\['b'\\]"), ({"a": 1, "b": 2, "c": 3}, "unknown \\['c'\\]"),
     (3, "size must be a name")],
)  # fmt: skip
def test_resolve_size_names_a_bad_size(size, match):
    with pytest.raises(ValueError, match=match):
        resolve_size({"s": {"a": 1, "b": 2}}, size, a=None, b=None)


def test_tables_hold_the_papers_sizes():
    # ViT-B (Dosovitskiy et al., Table 1), SPAD-ViT's release (SwiGLU 2048), Swin-B (Liu et al., Sec. 3.3)
    assert VIT_SIZES["base"] == dict(zip(VIT_KEYS, (768, 12, 12, 3072)))
    assert SPAD_VIT_SIZES["base"] == dict(zip(VIT_KEYS, (768, 12, 12, 2048)))
    assert SWIN_SIZES["base"] == {"patch_size": 4, "window_size": 7, "embed_dim": 128, "depths": (2, 2, 18, 2),
                                  "num_heads": (4, 8, 16, 32), "mlp_ratio": 4.0}  # fmt: skip


def test_vit_encoder_by_name_equals_the_hand_written_size():
    torch.manual_seed(0)
    named = ViTEncoder(size="tiny", patch_size=16, num_layers=2)
    torch.manual_seed(0)
    hand = ViTEncoder(hidden_size=192, num_layers=2, num_heads=3, mlp_dim=768, patch_size=16)
    assert named.blocks[0].attn.num_heads == 3
    _same_weights(named, hand)


def test_default_vit_encoder_is_vit_b():
    torch.manual_seed(0)
    vit = ViTEncoder(num_layers=1)  # ViT-B's width, heads and MLP; one block keeps the test small
    torch.manual_seed(0)
    hand = ViTEncoder(hidden_size=768, num_layers=1, num_heads=12, mlp_dim=3072)
    assert (vit.hidden_size, vit.blocks[0].attn.num_heads) == (768, 12)
    _same_weights(vit, hand)


def test_spad_vit_by_mapping_equals_the_hand_written_size():
    size = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "mlp_dim": 48}
    torch.manual_seed(0)
    named = SpadViT(size=size, patch_size=4, pos_embed_shape=(2, 2, 2))
    torch.manual_seed(0)
    hand = SpadViT(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=48, patch_size=4, pos_embed_shape=(2, 2, 2))
    _same_weights(named, hand)


def test_panfm_encoder_by_mapping_equals_the_hand_written_size():
    organs, shapes = ("brain", "liver"), {"brain": (8, 8, 8), "liver": (8, 8, 4)}
    torch.manual_seed(0)
    named = PanFMEncoder(organs, shapes, patch_size=4, size={"hidden_size": 32, "num_layers": 2, "num_heads": 4,
                                                             "mlp_dim": 64})  # fmt: skip
    torch.manual_seed(0)
    hand = PanFMEncoder(organs, shapes, patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)
    _same_weights(named, hand)


def test_swin_by_name_equals_the_hand_written_swin_t():
    torch.manual_seed(0)
    named = SwinBackbone(img_size=32, size="tiny", depths=(1, 1, 1, 1))  # one block a stage keeps the test small
    torch.manual_seed(0)
    # Swin-T as Liu et al. give it: C = 96, heads 3-6-12-24, patch 4, window 7, MLP ratio 4
    hand = SwinBackbone(img_size=32, patch_size=4, window_size=7, embed_dim=96, depths=(1, 1, 1, 1),
                        num_heads=(3, 6, 12, 24), mlp_ratio=4.0)  # fmt: skip
    assert named.num_features == 768
    assert [len(stage.blocks) for stage in named.layers] == [1, 1, 1, 1]  # the explicit keyword wins
    _same_weights(named, hand)


def test_swin_by_mapping_equals_the_hand_written_size():
    size = {"patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": (2, 2), "num_heads": (2, 4), "mlp_ratio": 2.0}
    torch.manual_seed(0)
    named = SwinBackbone(img_size=16, size=size)
    torch.manual_seed(0)
    hand = SwinBackbone(img_size=16, patch_size=2, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                        mlp_ratio=2.0)  # fmt: skip
    _same_weights(named, hand)

