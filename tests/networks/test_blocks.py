import math

import pytest
import torch

from medfm.networks.blocks import (
    CrossAttention,
    MAEDecoder,
    PatchEmbed,
    SelfAttention,
    TextEncoder,
    ViTEncoder,
    load_clip_text_weights,
    patchify,
    sincos_pos_embed,
    unpatchify,
)


def test_patchify_roundtrip_and_conv_equivalence():
    x = torch.randn(2, 3, 8, 4, 12)
    p = (4, 2, 4)
    tokens = patchify(x, p)
    assert tokens.shape == (2, 2 * 2 * 3, 3 * 32)
    assert torch.equal(unpatchify(tokens, (2, 2, 3), p, 3), x)
    # token 1 is grid cell (0, 0, 1): voxels x[:, :, 0:4, 0:2, 4:8] flattened as (C, p0, p1, p2)
    assert torch.equal(tokens[:, 1], x[:, :, 0:4, 0:2, 4:8].reshape(2, -1))
    emb = PatchEmbed(3, 16, p)
    out, grid = emb(x)
    ref = emb.proj(x).flatten(2).transpose(1, 2)
    assert grid == (2, 2, 3)
    assert torch.allclose(out, ref, atol=1e-5)
    keep = torch.tensor([[5, 0], [11, 3]])
    sub, _ = emb(x, keep)
    assert torch.allclose(sub, torch.stack([ref[0, [5, 0]], ref[1, [11, 3]]]), atol=1e-5)


def test_patch_embed_ill_args():
    with pytest.raises(ValueError, match="divisible"):
        PatchEmbed(1, 8, 4)(torch.zeros(1, 1, 6, 8, 8))
    with pytest.raises(ValueError, match="channel"):
        PatchEmbed(1, 8, 4)(torch.zeros(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="spatial_dims"):
        PatchEmbed(1, 8, 4, spatial_dims=4)


def test_sincos_pos_embed_values_and_uniqueness():
    emb = sincos_pos_embed((3, 2, 4), 20)
    assert emb.shape == (24, 20)
    # channel 0 is sin(x * 1) of the first axis; raster order means token t has x = t // 8
    for t in range(24):
        assert emb[t, 0].item() == pytest.approx(math.sin(t // 8), abs=1e-6)
        assert emb[t, 15].item() == pytest.approx(math.cos(t % 4), abs=1e-6)  # axis 2: sin 12-14, cos 15-17
    assert torch.all(emb[:, 18:] == 0)  # 20 = 3 axes * 6 + 2 spare channels
    assert torch.unique(emb, dim=0).shape[0] == 24


def _naive_attention(q, k, v):
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


def test_self_attention_matches_naive():
    attn = SelfAttention(12, 3).eval()
    x = torch.randn(2, 5, 12)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 3, 4).permute(2, 0, 3, 1, 4)
    ref = attn.proj(_naive_attention(q, k, v).transpose(1, 2).reshape(2, 5, 12))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_cross_attention_queries_from_x_keys_values_from_context():
    ca = CrossAttention(8, 2, context_size=6).eval()
    x, ctx = torch.randn(2, 3, 8), torch.randn(2, 7, 6)
    q = ca.q(x).reshape(2, 3, 2, 4).transpose(1, 2)
    k, v = ca.kv(ctx).reshape(2, 7, 2, 2, 4).permute(2, 0, 3, 1, 4)
    ref = ca.proj(_naive_attention(q, k, v).transpose(1, 2).reshape(2, 3, 8))
    out = ca(x, ctx)
    assert out.shape == (2, 3, 8)
    assert torch.allclose(out, ref, atol=1e-5)
    # each query attends only to the context: changing another query leaves it unchanged
    x2 = x.clone()
    x2[:, 1:] += 1.0
    assert torch.allclose(ca(x2, ctx)[:, 0], out[:, 0], atol=1e-6)


def test_encoder_ignores_masked_voxels_and_is_permutation_equivariant():
    enc = ViTEncoder(in_channels=1, patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64).eval()
    x = torch.randn(1, 1, 8, 8, 8)  # 8 tokens
    keep = torch.tensor([[6, 1, 3]])
    out = enc(x, keep)["tokens"]
    assert out.shape == (1, 4, 32)
    x2 = x.clone()
    x2[:, :, 0:4, 0:4, 0:4] += 5.0  # token 0 is masked
    assert torch.allclose(enc(x2, keep)["tokens"], out, atol=1e-5)
    # the same tokens in another order give the same token features, reordered (positions travel along)
    out_perm = enc(x, torch.tensor([[3, 6, 1]]))["tokens"]
    assert torch.allclose(out_perm[:, 1:], out[:, [3, 1, 2]], atol=1e-5)
    assert torch.allclose(out_perm[:, 0], out[:, 0], atol=1e-5)


def test_forward_intermediates():
    enc = ViTEncoder(in_channels=1, patch_size=4, hidden_size=16, num_layers=3, num_heads=2, mlp_dim=32).eval()
    x = torch.randn(2, 1, 8, 8, 4)
    final, inter = enc.forward_intermediates(x, [0, -1])
    assert enc.token_grid(x) == (2, 2, 1) and len(inter) == 2
    assert torch.allclose(enc.norm(inter[1]), final, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        enc.forward_intermediates(x, [3])


def test_decoder_restores_raster_order():
    dec = MAEDecoder(16, 8, 16, 1, 2, 32, cross_attention=False).eval()
    cls, v1, v3 = torch.randn(3, 1, 1, 16)
    # raster tokens 1 and 3 visible; the same tokens given in two orders with matching ids_restore
    out_a = dec(torch.cat([cls, v1, v3], 1), (2, 2, 1), torch.tensor([[2, 0, 3, 1]]))
    out_b = dec(torch.cat([cls, v3, v1], 1), (2, 2, 1), torch.tensor([[2, 1, 3, 0]]))
    assert out_a.shape == (1, 4, 8)
    assert torch.allclose(out_a, out_b, atol=1e-6)
    with pytest.raises(ValueError, match="cross-attention"):
        MAEDecoder(16, 8, 16, 1, 2, 32, cross_attention=True)(torch.cat([cls, v1, v3], 1), (2, 2, 1),
                                                              torch.tensor([[2, 0, 3, 1]]))


def test_text_encoder_reads_eot_and_is_causal():
    te = TextEncoder(vocab_size=20, eot_id=2, context_length=8, width=16, num_layers=2, num_heads=2, output_dim=12)
    te.eval()
    a = torch.tensor([[1, 5, 6, 2, 0, 0, 0, 0]])
    b = torch.tensor([[1, 5, 6, 2, 9, 9, 9, 9]])  # differs only after the end-of-text token
    assert torch.allclose(te(a), te(b), atol=1e-6)
    c = torch.tensor([[1, 7, 6, 2, 0, 0, 0, 0]])
    assert not torch.allclose(te(a), te(c))
    with pytest.raises(ValueError, match="end-of-text"):
        te(torch.tensor([[1, 5, 6, 0, 0, 0, 0, 0]]))


def test_load_clip_text_weights_openai_names(tmp_path):
    width, layers, ctx, vocab = 16, 2, 77, 49408
    state = {
        "token_embedding.weight": torch.randn(vocab, width),
        "positional_embedding": torch.randn(ctx, width),
        "ln_final.weight": torch.randn(width),
        "ln_final.bias": torch.randn(width),
        "text_projection": torch.randn(width, 12),
        "visual.proj": torch.randn(3, 3),  # image tower: ignored
    }
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        state.update({
            p + "attn.in_proj_weight": torch.randn(3 * width, width), p + "attn.in_proj_bias": torch.randn(3 * width),
            p + "attn.out_proj.weight": torch.randn(width, width), p + "attn.out_proj.bias": torch.randn(width),
            p + "ln_1.weight": torch.randn(width), p + "ln_1.bias": torch.randn(width),
            p + "ln_2.weight": torch.randn(width), p + "ln_2.bias": torch.randn(width),
            p + "mlp.c_fc.weight": torch.randn(4 * width, width), p + "mlp.c_fc.bias": torch.randn(4 * width),
            p + "mlp.c_proj.weight": torch.randn(width, 4 * width), p + "mlp.c_proj.bias": torch.randn(width),
        })  # fmt: skip
    path = tmp_path / "clip.pt"
    torch.save(state, path)
    te = TextEncoder(vocab_size=30, eot_id=2, context_length=8, width=width, num_layers=layers, num_heads=2,
                     output_dim=12)
    report = load_clip_text_weights(te, path)
    assert len(report["loaded"]) == len(te.state_dict()) - 1  # everything but the token embedding
    assert [s.split(":")[0] for s in report["skipped"]] == ["token_embedding.weight"]
    assert torch.equal(te.positional_embedding, state["positional_embedding"][:8])
    assert torch.equal(te.blocks[1].attn.qkv.weight, state["transformer.resblocks.1.attn.in_proj_weight"])
    assert torch.equal(te.blocks[0].mlp.fc2.bias, state["transformer.resblocks.0.mlp.c_proj.bias"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_clip_text_weights(te, tmp_path / "nowhere.pt")
