"""The shared transformer trunk: layer-index checks, the one ``forward_intermediates`` contract of the four
backbones, EVA-02's attention and SwiGLU inside the shared block, CLS attention, DINOHead options and checkpoint
key names (the layering of medfm.networks is checked in tests/transforms/test_layering.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medfm.networks.blocks import (
    VIT_SIZES,
    DINOHead,
    Rope3D,
    SelfAttention,
    SwinBackbone,
    TransformerBlock,
    TransformerTrunk,
    ViTEncoder,
    eva_block,
    resolve_indices,
)
from medfm.networks.nets import (
    FratMAE,
    FratMAEClassifier,
    FratMAESegmenter,
    MIDoLHead,
    PanFMEncoder,
    PanFMSelfDistill,
    SpadViT,
)


@pytest.mark.parametrize(
    "indices, expected", [([0, 2], [0, 2]), ([-1, 0, -3], [3, 0, 1]), ((), []), (2, [2, 3]), (0, []), (4, [0, 1, 2, 3])]
)
def test_resolve_indices(indices, expected):
    assert resolve_indices(indices, 4) == expected


@pytest.mark.parametrize("indices", [[4], [-5], [0, 7], 5, -1, [1.0], [True], True])
def test_resolve_indices_ill_args(indices):
    with pytest.raises(ValueError, match=r"out of range|cannot take|integers|int count"):
        resolve_indices(indices, 4)


def test_trunk_drop_path_schedule_and_ill_args():
    rates = []
    TransformerTrunk(lambda r: rates.append(r) or nn.Identity(), 5, 0.2)
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    with pytest.raises(ValueError, match="num_layers"):
        TransformerTrunk(lambda r: nn.Identity(), 0)
    with pytest.raises(ValueError, match="drop_path_rate"):
        TransformerTrunk(lambda r: nn.Identity(), 2, 1.0)


def test_trunk_forward_keeps_outputs_in_order_and_stops_early():
    trunk = TransformerTrunk(lambda r: _AddOne(), 4)
    x = torch.zeros(1, 1, 1)
    out, kept = trunk(x, [2, 0, -1])
    assert float(out) == 4 and [float(k) for k in kept] == [3, 1, 4]
    out, kept = trunk(x, [1], stop_early=True)
    assert float(out) == 2 and [float(k) for k in kept] == [2]
    assert isinstance(trunk[1], _AddOne) and len(trunk[1:3]) == 2 and trunk[-1] is trunk[3]


class _AddOne(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def test_spad_vit_encode_rejects_out_of_range_indices():
    vit = SpadViT(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=24, pos_embed_shape=(1, 2, 2)).eval()
    tokens, grid = vit.embed(torch.rand(1, 3, 1, 32, 32), 5)
    _, feats = vit.encode(tokens, grid, [-2, 1])
    assert len(feats) == 2
    with pytest.raises(ValueError, match="out of range"):
        vit.encode(tokens, grid, [2])  # was silently block 0
    with pytest.raises(ValueError, match="out of range"):
        vit.forward_intermediates(torch.rand(1, 3, 1, 32, 32), [-3], aniso_d=5)


def _backbones():
    """(model, input, keyword inputs, blocks or stages) for each backbone."""
    torch.manual_seed(0)
    vit = ViTEncoder(in_channels=1, patch_size=4, hidden_size=16, num_layers=3, num_heads=2, mlp_dim=32)
    spad = SpadViT(hidden_size=16, num_layers=3, num_heads=2, mlp_dim=24, pos_embed_shape=(1, 2, 2))
    shapes = {"brain": (8, 8, 8), "heart": (4, 8, 8)}
    sizes = {"hidden_size": 16, "num_layers": 3, "num_heads": 2, "mlp_dim": 32}
    panfm = PanFMEncoder(("brain", "heart"), shapes, patch_size=4, **sizes)
    images = {o: torch.randn(2, 1, *s) for o, s in shapes.items()}
    present = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    swin = SwinBackbone(img_size=16, patch_size=2, window_size=4, embed_dim=8, depths=(1, 1, 1), num_heads=(2, 2, 2))
    return [
        (vit, torch.randn(2, 1, 8, 8, 8), {}, 3),
        (spad, torch.rand(1, 3, 1, 32, 32), {"aniso_d": 5}, 3),
        (panfm, images, {"present": present}, 3),
        (swin, torch.randn(2, 3, 16, 16), {}, 3),
    ]


@pytest.mark.parametrize("case", range(4), ids=["ViTEncoder", "SpadViT", "PanFMEncoder", "SwinBackbone"])
def test_one_forward_intermediates_contract(case):
    model, x, kw, depth = _backbones()[case]
    model.eval()
    final, inter = model.forward_intermediates(x, [0, -1], **kw)
    assert isinstance(inter, list) and len(inter) == 2
    _, last = model.forward_intermediates(x, 1, **kw)  # an int takes the last n
    torch.testing.assert_close(last[0], inter[1])
    _, first = model.forward_intermediates(x, [0], stop_early=True, **kw)
    torch.testing.assert_close(first[0], inter[0])
    final_only, none = model.forward_intermediates(x, **kw)
    assert none == []
    torch.testing.assert_close(final_only, final)
    for bad in ([depth], [-depth - 1]):
        with pytest.raises(ValueError, match="out of range"):
            model.forward_intermediates(x, bad, **kw)


def test_final_is_the_normed_last_output():
    vit, x, _, _ = _backbones()[0]
    final, (last,) = vit.eval().forward_intermediates(x, [-1])
    torch.testing.assert_close(final, vit.norm(last))
    swin, x, _, _ = _backbones()[3]
    final, (last,) = swin.eval().forward_intermediates(x, [-1])
    torch.testing.assert_close(final, swin.norm(last.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def _naive_eva_attention(attn: SelfAttention, x, cos, sin, prefix):
    b, n, c = x.shape
    h = attn.num_heads
    d = c // h
    w = attn.qkv.weight
    q = x @ w[:c].T + attn.q_bias
    k = x @ w[c : 2 * c].T
    v = x @ w[2 * c :].T + attn.v_bias
    q, k, v = (t.reshape(b, n, h, d).transpose(1, 2) for t in (q, k, v))

    def rotate(t):
        out = t.clone()
        for j in range(d // 2):  # channel pairs (2j, 2j+1) turned by their angle
            a, bb = t[..., prefix:, 2 * j], t[..., prefix:, 2 * j + 1]
            out[..., prefix:, 2 * j] = a * cos[:, j] - bb * sin[:, j]
            out[..., prefix:, 2 * j + 1] = bb * cos[:, j] + a * sin[:, j]
        return out

    q, k = rotate(q), rotate(k)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return attn.proj((probs @ v).transpose(1, 2).reshape(b, n, c))


def test_eva_block_is_the_shared_block_with_qv_bias_rope_and_swiglu():
    torch.manual_seed(0)
    blk = eva_block(16, 2, 24).eval()
    assert isinstance(blk, TransformerBlock) and isinstance(blk.attn, SelfAttention)
    assert blk.attn.qkv.bias is None and blk.norm1.eps == 1e-5
    for p in (blk.attn.q_bias, blk.attn.v_bias):
        nn.init.normal_(p)
    # the key names of the released EVA-02 / SPAD-ViT layout
    assert sorted(blk.state_dict()) == sorted(
        ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
         "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.norm.weight",
         "mlp.norm.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    )  # fmt: skip
    x = torch.randn(2, 5, 16)
    cos, sin = Rope3D(8)((1, 2, 2))
    h = x + _naive_eva_attention(blk.attn, blk.norm1(x), cos, sin, prefix=1)
    y = blk.norm2(h) @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
    gate, value = y[..., :24], y[..., 24:]
    expected = h + blk.mlp.fc2(blk.mlp.norm(gate * torch.sigmoid(gate) * value))
    torch.testing.assert_close(blk(x, rope=(cos, sin)), expected, rtol=1e-5, atol=1e-5)


def test_attention_ill_args():
    with pytest.raises(ValueError, match="qkv_bias"):
        SelfAttention(16, 2, qkv_bias="k")
    with pytest.raises(ValueError, match="cross-attention"):
        TransformerBlock(16, 2, 32, qkv_bias="qv", cross_attention=True)


@pytest.mark.parametrize("qkv_bias", [True, "qv"])
def test_cls_attention_matches_naive_softmax(qkv_bias):
    torch.manual_seed(0)
    attn = SelfAttention(16, 4, qkv_bias=qkv_bias)
    if qkv_bias == "qv":
        nn.init.normal_(attn.q_bias)
    else:
        nn.init.normal_(attn.qkv.bias)
    x = torch.randn(2, 6, 16)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    bias = attn._qkv_bias()
    q = (x[:, 0] @ attn.qkv.weight[:16].T + bias[:16]).reshape(2, 4, 4)
    k = (x @ attn.qkv.weight[16:32].T + bias[16:32]).reshape(2, 6, 4, 4)
    logits = torch.einsum("bhd,bnhd->bhn", q, k) / 2.0
    expected = logits.masked_fill(~valid[:, None], float("-inf")).softmax(-1)
    got = attn.cls_attention(x, valid)
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad and got[1, :, 3:5].abs().max() == 0


def test_dino_head_without_mlp_and_ill_args():
    head = DINOHead(6, 10, nlayers=0, bottleneck_dim=None)
    assert isinstance(head.mlp, nn.Identity) and head.last_v.shape == (10, 6)
    x = torch.randn(3, 6)
    torch.testing.assert_close(head(x), F.normalize(x, dim=-1) @ F.normalize(head.last_v, dim=1).T)
    with pytest.raises(ValueError, match="bottleneck_dim"):
        DINOHead(6, 10, nlayers=0, bottleneck_dim=4)
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(6, 10, nlayers=-1)


def test_midol_head_without_bottleneck_keeps_the_seeded_prototype_init():
    """The prototypes of the MLP-free head come from the same random stream as when the head was built with a
    square projection that it then discarded."""
    torch.manual_seed(3)
    head = MIDoLHead(6, num_experts=2, out_dim=10, hidden_dim=8)
    after_plain = torch.randn(4)
    torch.manual_seed(3)
    with_square = MIDoLHead(6, num_experts=2, out_dim=10, hidden_dim=8, bottleneck_dim=6)  # MoE, Linear(6, 6), v
    after_square = torch.randn(4)
    torch.testing.assert_close(head.last_layer.last_v, with_square.last_layer.last_v)
    torch.testing.assert_close(head.moe.state_dict(), with_square.moe.state_dict())
    assert torch.equal(after_plain, after_square)  # the draws after the head are the same too
    assert "last_layer.mlp.0.weight" not in head.state_dict()


def _vit_block_keys(prefix: str, eva: bool) -> list[str]:
    attn = ["attn.qkv.weight", "attn.q_bias", "attn.v_bias"] if eva else ["attn.qkv.weight", "attn.qkv.bias"]
    mlp = ["mlp.fc1.weight", "mlp.fc1.bias", "mlp.norm.weight", "mlp.norm.bias"] if eva else ["mlp.fc1.weight",
                                                                                              "mlp.fc1.bias"]
    names = ["norm1.weight", "norm1.bias", *attn, "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
             *mlp, "mlp.fc2.weight", "mlp.fc2.bias"]  # fmt: skip
    return [prefix + n for n in names]


def test_checkpoint_key_names_are_those_of_earlier_checkpoints():
    """The block stack keeps the earlier layout (``blocks.<i>.{norm1,attn,norm2,mlp}.*``), so checkpoints written
    before the shared trunk load without a converter."""
    vit = ViTEncoder(in_channels=1, patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
    expected = ["cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]
    expected += _vit_block_keys("blocks.0.", False) + _vit_block_keys("blocks.1.", False)
    assert sorted(vit.state_dict()) == sorted(expected)
    spad = SpadViT(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=24, pos_embed_shape=(1, 2, 2))
    expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "norm.bias"] + _vit_block_keys("blocks.0.", True) + _vit_block_keys("blocks.1.", True)  # fmt: skip
    assert sorted(spad.state_dict()) == sorted(expected)
    # an earlier-layout state dict written by hand (shapes from the sizes) loads strictly
    shapes = {k: v.shape for k, v in spad.state_dict().items()}
    spad.load_state_dict({k: torch.full(s, 0.5) for k, s in shapes.items()}, strict=True)
    assert float(spad.blocks[1].attn.v_bias[0]) == 0.5
    plain = MIDoLHead(6, num_experts=2, out_dim=10, hidden_dim=8)
    assert sorted(k for k in plain.state_dict() if k.startswith("last_layer")) == ["last_layer.last_v"]
    square = MIDoLHead(6, num_experts=2, out_dim=10, hidden_dim=8, bottleneck_dim=4)
    assert sorted(k for k in square.state_dict() if k.startswith("last_layer")) == [
        "last_layer.last_v", "last_layer.mlp.0.bias", "last_layer.mlp.0.weight"
    ]  # fmt: skip


def test_named_vit_size():
    vit = ViTEncoder(**VIT_SIZES["tiny"], patch_size=16)
    assert (vit.hidden_size, len(vit.blocks), vit.blocks[0].attn.num_heads) == (192, 12, 3)
    assert vit.blocks[0].mlp.fc1.out_features == 4 * 192


def test_panfm_attention_needs_the_whole_stack():
    panfm, images, kw, _ = _backbones()[2]
    out, _ = panfm.eval().forward_intermediates(images, [0], return_attention=True, **kw)
    torch.testing.assert_close(out.organ_attention.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="stop_early"):
        panfm.forward_intermediates(images, [0], return_attention=True, stop_early=True, **kw)


@pytest.mark.parametrize(
    "module", ["trunk", "dino_head", "linear_probe", "code_usage", "eva_block", "transformer_block", "attention"]
)
def test_shared_blocks_are_exported_by_the_package(module):
    import importlib

    import medfm.networks.blocks as blocks

    mod = importlib.import_module(f"medfm.networks.blocks.{module}")
    assert set(mod.__all__) <= set(blocks.__all__)
    assert all(getattr(blocks, n) is getattr(mod, n) for n in mod.__all__)


@pytest.mark.parametrize(
    "build",
    [
        lambda: FratMAE(1, 16),  # once in_channels, patch_size; now the second would be the decoder width
        lambda: FratMAESegmenter(2, 16, 768),  # the third was hidden_size, now it would be feature_size
        lambda: FratMAEClassifier(2, 16),  # the second was patch_size, now it would be mlp_hidden
        lambda: PanFMSelfDistill(("brain",), {"brain": (8, 8, 8)}, 8),  # the third was patch_size
    ],
)
def test_models_with_keyword_encoder_sizes_refuse_positional_options(build):
    with pytest.raises(TypeError):
        build()


def test_trunk_checkpoints_only_in_training_with_autograd(monkeypatch):
    from medfm.networks.blocks import trunk as trunk_module

    calls = []
    real = trunk_module.checkpoint
    monkeypatch.setattr(trunk_module, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    trunk = TransformerTrunk(lambda r: nn.Linear(2, 2), 3)
    trunk.set_grad_checkpointing()
    x = torch.randn(1, 4, 2, requires_grad=True)
    for training, grad, expected in [(True, True, 3), (False, True, 0), (True, False, 0)]:
        calls.clear()
        trunk.train(training)
        with torch.set_grad_enabled(grad):
            trunk(x)
        assert len(calls) == expected, (training, grad)
