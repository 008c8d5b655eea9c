"""Shared test inputs for SPAD-ViT: a tiny encoder size and a state dict laid out as the authors' release."""

from __future__ import annotations

import torch

TINY_VIT = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=48, pos_embed_shape=(2, 2, 2))


def official_vit_state(c=32, depth=2, heads=2, hidden=48, codes=24, patch=16, seed=0):
    """A state dict with the release's key names and shapes (``pumit-b.ckpt``), random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    sd = {
        "cls_token": r(1, 1, c),
        "pos_embed": r(1, c, 2, 2, 2),
        "patch_embed.proj.weight": r(c, 3, patch, patch, patch) / patch,
        "patch_embed.proj.bias": r(c),
        "norm.weight": 1 + r(c),
        "norm.bias": r(c),
        "mask_token": r(1, 1, c),
        "mim_head.0.weight": r(c, c),
        "mim_head.0.bias": r(c),
        "mim_head.2.weight": r(codes, c),
        "mim_head.2.bias": r(codes),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[p + n + ".weight"], sd[p + n + ".bias"] = 1 + r(c), r(c)
        for n in "qkv":
            sd[p + f"attn.{n}_proj.weight"] = r(c, c)
        sd[p + "attn.q_bias"], sd[p + "attn.v_bias"] = r(c), r(c)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = r(c, c), r(c)
        sd[p + "mlp.w1.weight"], sd[p + "mlp.w1.bias"] = r(hidden, c), r(hidden)
        sd[p + "mlp.w2.weight"], sd[p + "mlp.w2.bias"] = r(hidden, c), r(hidden)
        sd[p + "mlp.ffn_ln.weight"], sd[p + "mlp.ffn_ln.bias"] = 1 + r(hidden), r(hidden)
        sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"] = r(c, hidden), r(c)
    return sd
