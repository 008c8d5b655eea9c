import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from medfm.networks.blocks import DINOHead, SelfAttention, TransformerBlock
from medfm.networks.nets import PanFMEncoder, PanFMSelfDistill, panfm_encoder_state

ORG = ("brain", "heart", "liver")
SHAPES = {"brain": (8, 8, 8), "heart": (16, 8, 8), "liver": (8, 8, 8)}
NTOK = {"brain": 8, "heart": 16, "liver": 8}  # patch 4
SMALL = {"patch_size": 4, "hidden_size": 16, "num_layers": 2, "num_heads": 2, "mlp_dim": 32}


def _encoder(**kw):
    return PanFMEncoder(ORG, SHAPES, **{**SMALL, **kw}).eval()


def _images(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {o: torch.randn(b, 1, *SHAPES[o], generator=g) for o in ORG}


def _present(rows):
    return torch.tensor(rows, dtype=torch.bool)


def _sub(images, idx):
    return {o: x[idx] for o, x in images.items()}


# ---------------------------------------------------------------- key padding in the shared blocks


def test_self_attention_default_is_unchanged_and_all_valid_mask_matches():
    attn = SelfAttention(12, 3).eval()
    x = torch.randn(2, 5, 12)
    assert torch.equal(attn(x), attn(x, attn_mask=None))
    assert torch.allclose(attn(x, attn_mask=torch.ones(2, 5, dtype=torch.bool)), attn(x), atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_key_padding_matches_naive(causal):
    attn = SelfAttention(12, 3, causal=causal).eval()
    x = torch.randn(2, 6, 12)
    valid = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    q, k, v = attn.qkv(x).reshape(2, 6, 3, 3, 4).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / 2.0
    allowed = valid[:, None, None, :] & (torch.ones(6, 6).tril().bool() if causal else True)
    w = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 6, 12))
    out = attn(x, attn_mask=valid)
    assert torch.allclose(out[0], ref[0], atol=1e-5)
    assert torch.allclose(out[1, :4], ref[1, :4], atol=1e-5)


def test_block_padded_sample_equals_its_unpadded_output():
    block = TransformerBlock(16, 2, 32).eval()
    x = torch.randn(2, 7, 16)
    valid = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    x_pad = x.clone()
    x_pad[1, 4:] = 100.0  # padding content must not matter
    out = block(x_pad, attn_mask=valid)
    assert torch.allclose(out[1, :4], block(x[1:2, :4])[0], atol=1e-5)
    assert torch.allclose(out[0], block(x[:1])[0], atol=1e-5)
    with pytest.raises(ValueError, match="key-padding"):
        block(x, attn_mask=valid.float())


# ---------------------------------------------------------------- encoder packing


def test_packing_layout_and_tokens_match_a_naive_embedding():
    enc = _encoder()
    images = _images(3)
    present = _present([[1, 1, 1], [1, 0, 1], [0, 1, 0]])
    tokens, token_organ, masked = enc.pack(images, present)
    lengths = [sum(NTOK[o] for o, p in zip(ORG, row) if p) for row in present.tolist()]
    assert tokens.shape == (3, max(lengths), 16) and not masked.any()
    for b, row in enumerate(present.tolist()):
        expected, ref = [], []
        for i, (o, p) in enumerate(zip(ORG, row)):
            if p:
                expected += [i] * NTOK[o]
                conv = enc.patch_embed[o].proj(images[o][b : b + 1]).flatten(2)[0].t()  # (n, C) raster order
                ref.append(conv + getattr(enc, f"pos_{o}") + enc.organ_embed[i])
        expected += [-1] * (max(lengths) - lengths[b])
        assert token_organ[b].tolist() == expected
        assert torch.allclose(tokens[b, : lengths[b]], torch.cat(ref), atol=1e-5)
        assert torch.all(tokens[b, lengths[b] :] == 0)


def test_missing_organ_content_is_never_read_and_padding_is_invisible():
    enc = _encoder()
    images = _images(3)
    present = _present([[1, 1, 1], [1, 0, 1], [0, 1, 0]])
    out = enc(images, present, return_attention=True)
    changed = {o: x.clone() for o, x in images.items()}
    changed["heart"][1] = 50.0  # sample 1 lacks the heart
    changed["brain"][2] = -7.0  # sample 2 lacks the brain
    out2 = enc(changed, present, return_attention=True)
    for a, b in zip(out, out2):
        assert torch.equal(a, b)
    # each subject alone (no padding) gives the same outputs as inside the padded batch
    for b in range(3):
        alone = enc(_sub(images, slice(b, b + 1)), present[b : b + 1], return_attention=True)
        n = int(out.valid[b].sum())
        assert alone.tokens.shape[1] == n
        assert torch.allclose(alone.tokens[0], out.tokens[b, :n], atol=1e-5)
        assert torch.allclose(alone.cls[0], out.cls[b], atol=1e-5)
        assert torch.allclose(alone.organ_attention[0], out.organ_attention[b], atol=1e-5)


def test_masked_differs_from_missing_and_hides_the_content():
    enc = _encoder()
    images = _images(1)
    all_present = _present([[1, 1, 1]])
    mask_heart = _present([[0, 1, 0]])
    masked = enc(images, all_present, organ_mask=mask_heart)
    missing = enc(images, _present([[1, 0, 1]]))
    assert masked.tokens.shape[1] == 32 and missing.tokens.shape[1] == 16
    assert masked.masked[0].tolist() == [False] * 8 + [True] * 16 + [False] * 8
    assert not torch.allclose(masked.cls, missing.cls, atol=1e-3)
    # the masked organ's voxels do not matter, its slots hold mask token + position + organ embedding
    other = {o: x.clone() for o, x in images.items()}
    other["heart"] += 3.0
    assert torch.equal(enc(other, all_present, organ_mask=mask_heart).cls, masked.cls)
    tokens, _, _ = enc.pack(images, all_present, mask_heart)
    ref = enc.mask_token[0] + enc.pos_heart + enc.organ_embed[1]
    assert torch.allclose(tokens[0, 8:24], ref, atol=1e-6)
    # a mask on a missing organ is ignored
    ignored = enc(images, _present([[1, 0, 1]]), organ_mask=mask_heart)
    assert torch.equal(ignored.cls, missing.cls) and not ignored.masked.any()


def _flops(enc, images, present):
    with FlopCounterMode(display=False) as fc:
        enc(images, present)
    return fc.get_total_flops()


def test_compute_falls_with_missingness_and_absent_organs_never_run():
    enc = _encoder()
    images = _images(2)
    full = _flops(enc, images, _present([[1, 1, 1], [1, 1, 1]]))
    one_missing = _flops(enc, images, _present([[1, 1, 1], [1, 0, 1]]))
    heart_gone = _flops(enc, images, _present([[1, 0, 1], [1, 0, 1]]))
    assert full > one_missing > heart_gone > 0
    calls = []
    enc.patch_embed["heart"].register_forward_hook(lambda *a: calls.append(1))
    enc(images, _present([[1, 0, 1], [1, 0, 0]]))
    assert calls == []
    enc(images, _present([[1, 0, 1], [1, 1, 0]]))
    assert calls == [1]


def test_organ_attention_matches_naive_cls_attention():
    enc = _encoder()
    images = _images(2)
    present = _present([[1, 1, 1], [0, 1, 1]])
    out = enc(images, present, return_attention=True)
    att = out.organ_attention
    assert torch.allclose(att.sum(1), torch.ones(2), atol=1e-6) and att[1, 0] == 0
    # naive: sample 1 alone, run block 0, full attention matrix of block 1 from its weights, CLS row
    tokens, token_organ, _ = enc.pack(_sub(images, slice(1, 2)), present[1:2])
    x = torch.cat([enc.cls_token, tokens], 1)
    x = enc.blocks[0](x)
    blk = enc.blocks[1]
    q, k, _ = blk.attn.qkv(blk.norm1(x)).reshape(1, -1, 3, 2, 8).permute(2, 0, 3, 1, 4)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)[0, :, 0].mean(0)  # CLS row, head mean
    share = torch.stack([w[1:][token_organ[0] == i].mean() if i else w.new_zeros(()) for i in range(3)])  # per token
    assert torch.allclose(att[1], share / share.sum(), atol=1e-5)


def test_clear_errors():
    enc = _encoder()
    images = _images(2)
    bad = dict(images, liver=torch.zeros(2, 1, 8, 8, 4))
    with pytest.raises(ValueError, match="organ 'liver'.*shape"):
        enc(bad, _present([[1, 1, 1], [1, 1, 1]]))
    with pytest.raises(ValueError, match=r"batch index \[1\] have no present organ"):
        enc(images, _present([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(KeyError, match="heart"):
        enc({"brain": images["brain"]}, _present([[1, 1, 0], [1, 0, 0]]))
    with pytest.raises(ValueError, match="present must be"):
        enc(images, torch.ones(2, 2, dtype=torch.bool))
    # an organ missing from the whole batch needs no image
    assert enc({"brain": images["brain"]}, _present([[1, 0, 0], [1, 0, 0]])).tokens.shape == (2, 8, 16)
    with pytest.raises(ValueError, match="organ 'heart'.*divisible"):
        PanFMEncoder(ORG, dict(SHAPES, heart=(10, 8, 8)), patch_size=4)
    with pytest.raises(ValueError, match="no shape for \\['liver'\\]"):
        PanFMEncoder(ORG, {"brain": (8, 8, 8), "heart": (16, 8, 8)}, patch_size=4)


def test_per_organ_patch_size_and_intermediates():
    enc = PanFMEncoder(ORG, SHAPES, **{**SMALL, "patch_size": {"brain": 4, "heart": 8, "liver": (2, 4, 4)}}).eval()
    assert enc.num_tokens == {"brain": 8, "heart": 2, "liver": 16}
    out, inter = enc.forward_intermediates(_images(2), [-1], present=_present([[1, 1, 1], [1, 1, 0]]))
    assert out.tokens.shape == (2, 26, 16)
    assert torch.allclose(enc.norm(inter[0])[:, 1:], out.tokens, atol=1e-6)
    assert enc.no_weight_decay() == {"cls_token", "mask_token", "organ_embed"}


def test_every_parameter_gets_a_gradient_and_checkpointing_is_identical():
    enc = _encoder(drop_path_rate=0.0).train()
    images, present = _images(2), _present([[1, 1, 1], [1, 1, 0]])
    mask = _present([[0, 1, 0], [0, 0, 0]])
    out = enc(images, present, organ_mask=mask)
    (out.cls.sum() + out.tokens[out.valid].pow(2).sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    enc.set_grad_checkpointing(True)
    assert torch.allclose(enc(images, present, organ_mask=mask).cls, out.cls, atol=1e-6)


def test_bf16_autocast_forward_on_cpu():
    enc = _encoder()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(_images(2), _present([[1, 1, 0], [0, 1, 1]]), organ_mask=_present([[1, 0, 0], [0, 0, 0]]))
    assert out.tokens.dtype == torch.bfloat16 and torch.isfinite(out.tokens.float()).all()


# ---------------------------------------------------------------- heads and the self-distillation pair


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_matches_manual_computation(norm_last_layer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecated weight_norm
        head = DINOHead(16, out_dim=40, hidden_dim=24, bottleneck_dim=8, nlayers=3, norm_last_layer=norm_last_layer)
    x = torch.randn(5, 16)
    lin = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(16, 24), (24, 24), (24, 8)]
    h = F.gelu(lin[0](x))
    h = lin[2](F.gelu(lin[1](h)))
    h = h / h.norm(dim=-1, keepdim=True)
    v = head.last_v
    w = v / v.norm(dim=1, keepdim=True)
    assert torch.allclose(head(x), h @ w.t(), atol=1e-5)
    assert (head.last_g is None) == norm_last_layer
    names = {n for n, _ in head.named_parameters()}
    assert ("last_g" in names) != norm_last_layer
    assert DINOHead(16, 40, nlayers=1, bottleneck_dim=8)(x).shape == (5, 40)


def _pair(**kw):
    heads = {"out_dim": 32, "patch_out_dim": 24, "head_hidden_dim": 24, "head_bottleneck_dim": 8}
    return PanFMSelfDistill(ORG, SHAPES, **SMALL, **{**heads, **kw})


def test_pair_state_dict_teacher_copy_and_alignment():
    model = _pair(drop_path_rate=0.0)
    keys = list(model.state_dict())
    assert any(k.startswith("student.encoder.") for k in keys) and any(k.startswith("teacher.encoder.") for k in keys)
    assert {k[len("student.") :] for k in keys if k.startswith("student.")} == {
        k[len("teacher.") :] for k in keys if k.startswith("teacher.")
    }
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert model.student.training and not model.teacher.training
    images, present = _images(2), _present([[1, 1, 1], [1, 0, 1]])
    t = model.forward_teacher(images, present)
    s = model(images, present, _present([[0, 1, 0], [1, 0, 0]]))
    # same present set -> same token slots; the teacher starts as the student
    assert torch.equal(s["token_organ"], t["token_organ"]) and torch.equal(s["valid"], t["valid"])
    unmasked = model(images, present)
    model.eval()
    assert torch.allclose(model(images, present)["cls_logits"], t["cls_logits"], atol=1e-6)
    assert unmasked["patch_logits"].shape == (0, 24)
    assert s["patch_logits"].shape == (16 + 8, 24)
    tp = model.teacher_patch_logits(t["tokens"], s["masked"])
    assert tp.shape == s["patch_logits"].shape and not tp.requires_grad
    # downstream loads the teacher's encoder by key filtering
    enc = PanFMEncoder(ORG, SHAPES, **SMALL).eval()
    enc.load_state_dict(panfm_encoder_state(model.state_dict()))
    assert torch.allclose(enc(images, present).cls, model.teacher.encoder(images, present).cls)
    with pytest.raises(ValueError, match="branch"):
        panfm_encoder_state(model.state_dict(), "ema")


def test_shared_head_option():
    model = _pair(shared_head=True, patch_out_dim=32)
    assert model.student.patch_head is None and not any("patch_head" in k for k in model.state_dict())
    t = model.forward_teacher(_images(1), _present([[1, 1, 0]]))
    s = model(_images(1), _present([[1, 1, 0]]), _present([[1, 0, 0]]))
    assert torch.equal(
        model.teacher_patch_logits(t["tokens"], s["masked"]), model.teacher.head(t["tokens"][s["masked"]])
    )
    with pytest.raises(ValueError, match="shared_head"):
        _pair(shared_head=True)


def test_ema_update_matches_naive_loop_and_teacher_gets_no_gradient():
    model = _pair()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    teacher0 = copy.deepcopy(model.teacher.state_dict())
    images, present = _images(2), _present([[1, 1, 1], [1, 0, 1]])
    t = model.forward_teacher(images, present)
    s = model(images, present, _present([[0, 1, 0], [1, 0, 0]]))
    tp = model.teacher_patch_logits(t["tokens"], s["masked"])
    (s["cls_logits"].sum() + (s["patch_logits"] * tp).sum() + t["cls_logits"].sum()).backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.student.parameters())
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher0[k])  # forward and backward leave the teacher as it was
    student = dict(model.student.named_parameters())
    model.update_teacher(0.9)
    for name, p in model.teacher.named_parameters():
        expected = 0.9 * teacher0[name] + (1 - 0.9) * student[name].detach()
        assert torch.allclose(p, expected, atol=1e-6), name
    with pytest.raises(ValueError, match="momentum"):
        model.update_teacher(1.5)


def test_panfm_network_def_builds_from_the_config_alone(tmp_path):
    """inference.json's network has ``num_labels`` outputs from the config, with no subject table anywhere."""
    from monai.bundle import ConfigParser

    configs = Path(__file__).resolve().parents[2] / "bundles" / "panfm_panorgan" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "inference.json")])
    parser["dataset_dir"] = str(tmp_path / "no_such_dataset")
    parser["bundle_root"] = str(tmp_path)
    for k, v in {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_dim": 64}.items():
        parser[f"network_def#{k}"] = v
    net = parser.get_parsed_content("network_def")
    assert parser["num_labels"] == 4 and net.head.out_features == 4


# ---------------------------------------------------------------- position scale, input centring, old checkpoints


def test_input_centring_mean_and_position_scale_match_a_naive_embedding():
    model = _pair(drop_path_rate=0.0, pos_embed_scale=0.25, input_centering=True).train()
    rows = ([[1, 1, 0], [1, 0, 1], [0, 1, 1]], [[1, 1, 1]] * 3)
    batches = [(_images(3, seed=s), _present(p)) for s, p in zip((1, 2), rows)]
    for images, present in batches:
        model.forward_teacher(images, present)
    for i, o in enumerate(ORG):  # the mean of every present image seen, by a naive loop
        seen = [images[o][b] for images, present in batches for b in range(3) if present[b, i]]
        naive = torch.stack(seen).mean(0)
        for enc in (model.teacher.encoder, model.student.encoder):
            assert torch.allclose(getattr(enc, f"input_mean_{o}"), naive, atol=1e-6), o
            assert enc.input_count[i] == len(seen)
    model.eval()
    before = model.teacher.encoder.input_mean_brain.clone()
    images, present = _images(2, seed=3), _present([[1, 1, 1], [1, 0, 1]])
    model.forward_teacher(images, present)  # evaluation mode: the means stay
    assert torch.equal(model.teacher.encoder.input_mean_brain, before)
    enc = model.teacher.encoder
    tokens, _, _ = enc.pack(images, present)
    for b, row in enumerate(present.tolist()):
        ref = []
        for i, (o, p) in enumerate(zip(ORG, row)):
            if p:
                x = images[o][b : b + 1] - getattr(enc, f"input_mean_{o}")
                conv = enc.patch_embed[o].proj(x).flatten(2)[0].t()
                ref.append(conv + 0.25 * getattr(enc, f"pos_{o}") + enc.organ_embed[i])
        ref = torch.cat(ref)
        assert torch.allclose(tokens[b, : len(ref)], ref, atol=1e-5)
    with pytest.raises(ValueError, match="pos_embed_scale"):
        _encoder(pos_embed_scale=-1.0)


def test_checkpoints_without_the_new_buffers_load_as_they_were_trained(tmp_path):
    from medfm.networks import load_panfm_encoder
    from medfm.networks.nets import PanFMClassifier

    new = {"pos_scale", "input_count", *(f"input_mean_{o}" for o in ORG)}
    model = _pair(drop_path_rate=0.0, pos_embed_scale=0.25, input_centering=True).train()
    model.forward_teacher(_images(2), _present([[1, 1, 1], [1, 0, 1]]))  # non-zero means
    old = {k: v for k, v in model.state_dict().items() if k.split(".")[-1] not in new}
    assert len(old) == len(model.state_dict()) - 2 * len(new)
    fresh = _pair(drop_path_rate=0.0, pos_embed_scale=0.25)
    fresh.load_state_dict(old)  # strict
    images, present = _images(2, seed=4), _present([[1, 1, 1], [0, 1, 1]])
    for enc in (fresh.student.encoder, fresh.teacher.encoder):
        assert float(enc.pos_scale) == 1.0 and all(not getattr(enc, f"input_mean_{o}").any() for o in ORG)
    # what the code before these buffers computed: images as they are, the full sine-cosine embedding
    tokens, _, _ = fresh.teacher.encoder.pack(images, present)
    enc = fresh.teacher.encoder
    conv = enc.patch_embed["brain"].proj(images["brain"][:1]).flatten(2)[0].t()
    assert torch.allclose(tokens[0, :8], conv + enc.pos_brain + enc.organ_embed[0], atol=1e-5)
    torch.save(old, tmp_path / "old.pt")
    clf = PanFMClassifier(2, organs=ORG, organ_shapes=SHAPES, **SMALL)
    load_panfm_encoder(clf, tmp_path / "old.pt")
    assert float(clf.encoder.pos_scale) == 1.0
    assert torch.allclose(clf.encoder.eval()(images, present).cls, enc(images, present).cls, atol=1e-6)
    # a fine-tuned model written before the buffers: strict loading by file, and the release check
    from medfm.networks import load_weights
    from medfm.utils.release import check_weights_fit

    old_clf = {k: v for k, v in clf.state_dict().items() if k.split(".")[-1] not in new}
    torch.save(old_clf, tmp_path / "old_clf.pt")
    clf2 = PanFMClassifier(2, organs=ORG, organ_shapes=SHAPES, pos_embed_scale=0.25, **SMALL)
    check_weights_fit(clf2, old_clf, tmp_path / "old_clf.pt")
    load_weights(clf2, tmp_path / "old_clf.pt")
    assert float(clf2.encoder.pos_scale) == 1.0
    assert torch.allclose(clf2.eval()(images, present), clf.eval()(images, present), atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):  # a file missing real weights is still refused
        check_weights_fit(clf2, {k: v for k, v in old_clf.items() if k != "head.weight"}, "x.pt")
    torch.save(model.state_dict(), tmp_path / "new.pt")  # a new checkpoint brings its scale and means along
    load_panfm_encoder(clf, tmp_path / "new.pt")
    assert float(clf.encoder.pos_scale) == 0.25
    assert torch.equal(clf.encoder.input_mean_heart, model.teacher.encoder.input_mean_heart)
