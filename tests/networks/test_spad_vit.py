"""SPAD-ViT, its MIM model, downstream models and the import of the authors' release."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from medfm.engines import SpadMIMPrepareBatch, batch_aniso_d
from medfm.losses.soft_ce import SoftTokenCELoss
from medfm.networks.nets.spad_vit import SpadViT, SpadViTMIM, resample_pos_embed
from medfm.networks.nets.spad_vit_downstream import SpadViTClassifier, SpadViTSegmenter
from medfm.networks.pretrained import load_spad_vit_encoder
from medfm.networks.pumit_release import convert_pumit_vit

from ..helpers_spad import TINY_VIT as TINY
from ..helpers_spad import official_vit_state


def reference_forward(sd, x, heads, depth, grid):
    """EVA-02 forward written from the release's tensors, token by token where it matters (isotropic input)."""
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1, 1)
    x = (x - mean) / std
    t = F.conv3d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16) + sd["pos_embed"]
    t = t.flatten(2).transpose(1, 2)
    seq = torch.cat((sd["cls_token"].expand(t.shape[0], -1, -1), t), 1)
    c = seq.shape[-1]
    hd = c // heads
    pairs = hd // 2
    positions = list(itertools.product(*[range(g) for g in grid]))

    def rotate(v):  # v: (L, hd) for patch tokens
        out = v.clone()
        for li, (z, y, xx) in enumerate(positions):
            for j in range(pairs):
                k = j % (pairs // 2)
                wz = 2333.0 ** (-(2 * k + 1) / pairs)
                wxy = 10000.0 ** (-2 * k / pairs)
                ang = z * wz + (y if j < pairs // 2 else xx) * wxy
                a, b = v[li, 2 * j], v[li, 2 * j + 1]
                out[li, 2 * j] = a * math.cos(ang) - b * math.sin(ang)
                out[li, 2 * j + 1] = b * math.cos(ang) + a * math.sin(ang)
        return out

    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(seq, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        q = h @ sd[p + "attn.q_proj.weight"].T + sd[p + "attn.q_bias"]
        k = h @ sd[p + "attn.k_proj.weight"].T
        v = h @ sd[p + "attn.v_proj.weight"].T + sd[p + "attn.v_bias"]
        outs = []
        for b in range(seq.shape[0]):
            head_out = []
            for hh in range(heads):
                sl = slice(hh * hd, (hh + 1) * hd)
                qb, kb, vb = q[b, :, sl], k[b, :, sl], v[b, :, sl]
                qb = torch.cat((qb[:1], rotate(qb[1:])))
                kb = torch.cat((kb[:1], rotate(kb[1:])))
                att = torch.softmax(qb @ kb.T / math.sqrt(hd), -1)
                head_out.append(att @ vb)
            outs.append(torch.cat(head_out, -1))
        seq = seq + torch.stack(outs) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = F.layer_norm(seq, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        x1 = h @ sd[p + "mlp.w1.weight"].T + sd[p + "mlp.w1.bias"]
        x2 = h @ sd[p + "mlp.w2.weight"].T + sd[p + "mlp.w2.bias"]
        hid = F.layer_norm(F.silu(x1) * x2, (x1.shape[-1],), sd[p + "mlp.ffn_ln.weight"], sd[p + "mlp.ffn_ln.bias"])
        seq = seq + hid @ sd[p + "mlp.w3.weight"].T + sd[p + "mlp.w3.bias"]
    return F.layer_norm(seq, (c,), sd["norm.weight"], sd["norm.bias"])


def test_release_keys_convert_without_unmatched_key_and_give_the_reference_function():
    sd = official_vit_state()
    model = SpadViTMIM(num_codes=24, **TINY)
    report = convert_pumit_vit(sd, model)
    assert report.ok, report.summary()
    model.load_state_dict(report.converted, strict=True)
    x = torch.rand(1, 3, 32, 32, 32)
    with torch.no_grad():
        ours = model.eval()(x, aniso_d=0)
        ref = reference_forward(sd, x, heads=2, depth=2, grid=(2, 2, 2))
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-4)


def test_release_conversion_reports_unmatched_keys():
    sd = official_vit_state()
    sd["blocks.0.attn.extra"] = torch.zeros(3)
    del sd["blocks.1.mlp.w3.weight"]
    sd["pos_embed"] = torch.zeros(1, 32, 5, 10, 10)
    report = convert_pumit_vit(sd, SpadViTMIM(num_codes=24, **TINY))
    assert not report.ok
    assert any("blocks.0.attn.extra" in k for k in report.unused_source)
    assert "blocks.1.mlp.fc2.weight" in report.missing_target
    assert any(k.startswith("pos_embed") for k in report.shape_mismatch)
    # the encoder alone: the MIM parts are reported, not silently dropped
    enc_report = convert_pumit_vit(official_vit_state(), SpadViT(**TINY))
    assert any(k.startswith("mask_token") for k in enc_report.unused_source)


def test_2d_image_equals_the_image_repeated_into_an_isotropic_volume():
    """The SPAD patch embedding makes a 2D image and its 16-slice extrusion the same token sequence."""
    torch.manual_seed(0)
    vit = SpadViT(**TINY).eval()
    img = torch.rand(2, 3, 1, 32, 48)
    with torch.no_grad():
        flat = vit(img, aniso_d=5)
        vol = vit(img.expand(-1, -1, 16, -1, -1), aniso_d=0)
    assert flat.shape == (2, 1 + 6, 32)
    torch.testing.assert_close(flat, vol, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shape, aniso_d, grid",
    [
        ((1, 1, 32, 32), 5, (1, 2, 2)),
        ((1, 32, 32, 32), 0, (2, 2, 2)),
        ((1, 8, 32, 32), 1, (1, 2, 2)),
        ((1, 12, 32, 32), 2, (3, 2, 2)),
    ],
)
def test_token_grid_follows_aniso_d(shape, aniso_d, grid):
    vit = SpadViT(**TINY)
    tokens, g = vit.embed(torch.rand(shape[0], 3, *shape[1:]), aniso_d)
    assert g == grid and tokens.shape == (1, math.prod(grid), 32)


def test_input_that_does_not_tile_is_refused():
    with pytest.raises(ValueError, match="does not tile"):
        SpadViT(**TINY)(torch.rand(1, 3, 10, 32, 32), aniso_d=0)


def test_pos_embed_resampling_area_then_trilinear():
    pe = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 1, 2, 4, 4)
    down = resample_pos_embed(pe, (1, 2, 2))
    manual = torch.tensor(
        [[pe[0, 0, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean() for j in range(2)] for i in range(2)]
    )
    torch.testing.assert_close(down[0, 0, 0], manual)
    assert resample_pos_embed(pe, (3, 8, 8)).shape == (1, 1, 3, 8, 8)


class _FakeTokenizer(torch.nn.Module):
    """Stride-16 'tokenizer': logits are a fixed linear map of 16^3 patch means (independent of the ViT)."""

    def __init__(self, codes=24):
        super().__init__()
        self.proj = torch.nn.Linear(3, codes)

    def tokenize(self, x, aniso_d):
        pd = max(16 >> aniso_d, 1)
        pooled = F.avg_pool3d(x, (pd, 16, 16))
        return type("Q", (), {"logits": self.proj(pooled.permute(0, 2, 3, 4, 1))})()


def test_mim_batch_loss_and_gradient():
    torch.manual_seed(0)
    tok = _FakeTokenizer()
    prep = SpadMIMPrepareBatch(tok, mask_ratio=0.55, seed=3)
    batch = {"image": torch.rand(2, 3, 8, 64, 64), "aniso_d": torch.tensor([1, 1])}
    image, targets, args, kwargs = prep(batch, "cpu")
    assert kwargs["aniso_d"] == 1 and args == ()
    mask = targets["mask"]
    num_tokens = 1 * 4 * 4
    assert mask.shape == (2, num_tokens)
    assert mask.sum(1).tolist() == [num_tokens - int(num_tokens * 0.45)] * 2
    # targets: softmax of the tokenizer logits of 2x-1, in row-major token order
    expected = tok.tokenize(2 * batch["image"] - 1, 1).logits.flatten(1, 3).softmax(-1)
    torch.testing.assert_close(targets["probs"], expected)
    model = SpadViTMIM(num_codes=24, **TINY)
    preds = model(image, **kwargs)
    assert preds["logits"].shape == (int(mask.sum()), 24)
    loss_terms = SoftTokenCELoss().forward_terms(preds, targets)
    t = targets["probs"][mask]
    manual = -(t * torch.log_softmax(preds["logits"], -1)).sum(-1).mean()
    torch.testing.assert_close(loss_terms["loss"], manual)
    kl = F.kl_div(torch.log_softmax(preds["logits"], -1), t, reduction="batchmean")
    torch.testing.assert_close(loss_terms["kld"], kl.detach(), atol=1e-5, rtol=1e-4)
    loss_terms["loss"].backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0


def test_short_mim_run_lowers_the_soft_token_cross_entropy():
    """25 AdamW steps of a tiny SPAD-ViT on four fixed 64^2 images: the soft-token CE (start ~log 24 = 3.18)
    falls clearly, towards the targets' entropy (its floor)."""
    torch.manual_seed(0)
    tok = _FakeTokenizer()
    torch.nn.init.normal_(tok.proj.weight, std=4.0)  # peaked soft tokens that depend on the patch intensity
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    imgs = []
    for _ in range(4):  # a disc at a random place on an intensity ramp
        cx, cy = (torch.rand(2, generator=g) - 0.5).tolist()
        imgs.append((((xx - cx) ** 2 + (yy - cy) ** 2) < 0.25).float() * 0.6 + 0.2 * (xx + 1))
    batch = {"image": torch.stack(imgs)[:, None, None].repeat(1, 3, 1, 1, 1), "aniso_d": torch.tensor([5] * 4)}
    prep = SpadMIMPrepareBatch(tok, mask_ratio=0.55, seed=0)
    model = SpadViTMIM(num_codes=24, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, pos_embed_shape=(1, 4, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        image, targets, _, kwargs = prep(batch, "cpu")
        loss = SoftTokenCELoss()(model(image, **kwargs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    p = targets["probs"]
    floor = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())  # entropy of the targets
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert start > math.log(24) - 0.1
    assert end < start - 0.8, losses
    assert end - floor < 0.5 * (start - floor), (losses, floor)


def test_mixed_aniso_batch_is_refused():
    with pytest.raises(ValueError, match="AnisoBatchSampler"):
        batch_aniso_d({"aniso_d": torch.tensor([0, 2])})


@pytest.mark.parametrize("shape, aniso_d", [((2, 3, 1, 64, 64), 5), ((1, 3, 32, 64, 64), 0), ((1, 3, 8, 64, 64), 2)])
def test_segmenter_output_matches_input_for_2d_and_3d(shape, aniso_d):
    net = SpadViTSegmenter(4, feature_layers=(0, 1, 1, 1), decoder_channels=(4, 4, 8, 8, 8, 8), **TINY)
    x = torch.rand(shape)
    y = net(x, aniso_d)
    assert y.shape == (shape[0], 4, *shape[2:])
    y.mean().backward()
    assert net.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_segmenter_feature_layers_follow_the_trunk_index_convention():
    """Negative indices and an int count resolve as in ``forward_intermediates``; out of range is a ValueError."""
    kw = dict(decoder_channels=(4, 4, 8, 8, 8, 8), **TINY)
    depth = SpadViTSegmenter(3, feature_layers=(0, 1, 1, 1), **kw).encoder.blocks.__len__()
    neg = SpadViTSegmenter(3, feature_layers=(-depth, 1 - depth, -1, -1), **kw)
    assert neg.feature_layers == (0, 1, depth - 1, depth - 1)
    if depth >= 4:
        assert SpadViTSegmenter(3, feature_layers=4, **kw).feature_layers == tuple(range(depth - 4, depth))
    with pytest.raises(ValueError, match="feature_layers"):
        SpadViTSegmenter(3, feature_layers=(0, 1, 1, depth), **kw)
    with pytest.raises(ValueError, match="4 blocks"):
        SpadViTSegmenter(3, feature_layers=(0, 1, 1), **kw)


@pytest.mark.parametrize("shape, aniso_d", [((2, 3, 1, 64, 64), 5), ((2, 3, 8, 64, 64), 2)])
def test_segmenter_deep_supervision(shape, aniso_d):
    kw = dict(feature_layers=(0, 1, 1, 1), decoder_channels=(4, 4, 8, 8, 8, 8), **TINY)
    torch.manual_seed(0)
    plain = SpadViTSegmenter(3, **kw)
    torch.manual_seed(0)
    net = SpadViTSegmenter(3, deep_supervision=True, **kw)
    assert len(plain.aux_heads) == 0 and len(net.aux_heads) == 2  # no unused modules when off
    assert net.deep_supervision_weights == pytest.approx([4 / 7, 2 / 7, 1 / 7])  # 1, 0.5, 0.25 normalised
    x = torch.rand(shape)
    outs = net(x, aniso_d)
    assert isinstance(outs, list) and len(outs) == 3
    assert all(o.shape == (shape[0], 3, *shape[2:]) for o in outs)
    assert isinstance(plain(x, aniso_d), torch.Tensor)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x, aniso_d), outs[0].detach())  # evaluation: the full-resolution logits
        # the level-1 head reads the decoder's level-1 features (half resolution in-plane), upsampled
        feats = {}
        hook = net.fuse[1].register_forward_hook(lambda m, a, o: feats.setdefault("h", o))
        net(x, aniso_d)
        hook.remove()
        h = feats["h"]
        assert h.shape[-2:] == (shape[-2] // 2, shape[-1] // 2)
        w = net.aux_heads[0].weight.flatten(1)
        low = torch.einsum("oc,ncdhw->nodhw", w, h) + net.aux_heads[0].bias.view(1, -1, 1, 1, 1)
        torch.testing.assert_close(outs[1].detach(), F.interpolate(low, size=shape[2:], mode="trilinear"))
    net.train()
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    label = torch.randint(0, 3, (shape[0], 1, *shape[2:]))
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    loss = DeepSupervisionLoss(dice_ce, weights=net.deep_supervision_weights)(outs, label)
    expected = sum(w * dice_ce(o, label) for w, o in zip([4 / 7, 2 / 7, 1 / 7], outs))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for name, param in net.named_parameters():
        if name.startswith("encoder.") and ("mask_token" in name or name.startswith("encoder.norm")):
            continue
        assert param.grad is not None, name
    assert all(param.grad.abs().sum() > 0 for param in net.aux_heads.parameters())
    with pytest.raises(ValueError, match="deep_supervision_heads"):
        SpadViTSegmenter(3, deep_supervision=True, deep_supervision_heads=1, **kw)


def test_classifier_and_encoder_transfer(tmp_path):
    mim = SpadViTMIM(num_codes=24, **TINY)
    path = tmp_path / "model.pt"
    torch.save({"model": mim.state_dict()}, path)
    clf = SpadViTClassifier(3, **TINY)
    report = load_spad_vit_encoder(clf, path)
    assert set(report["not_in_checkpoint"]) == {"head.weight", "head.bias"}
    torch.testing.assert_close(clf.encoder.pos_embed, mim.pos_embed)
    x = torch.rand(2, 3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clf.eval().encoder(x)[:, 0], mim.eval()(x)[:, 0])
    assert clf(x).shape == (2, 3)
    other = SpadViTClassifier(3, **{**TINY, "hidden_size": 64, "num_heads": 4})
    with pytest.raises(ValueError, match="does not fit"):
        load_spad_vit_encoder(other, path)


def test_weight_decay_groups_exempt_vectors_tokens_and_codebook():
    from medfm.networks.nets import SpadVT
    from medfm.utils import weight_decay_groups

    model = SpadViTMIM(num_codes=24, **TINY)
    decay, no_decay = weight_decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed", "mask_token", "blocks.0.attn.q_bias", "blocks.1.norm2.weight"} <= exempt
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - exempt
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert no_decay["weight_decay"] == 0.0
    vt = SpadVT(channels=(8, 16, 32), num_codes=24, code_dim=16)
    _, vt_no_decay = weight_decay_groups(vt, 0.05)
    assert any(p is vt.quantize.embedding.weight for p in vt_no_decay["params"])
