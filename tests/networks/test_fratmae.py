import pytest
import torch

from medfm.losses import FratMAELoss
from medfm.masking import asymmetric_cross_modal_masking, independent_masking
from medfm.networks.blocks import patchify
from medfm.networks.nets import FratMAE
from medfm.transforms import PromptTokenizer

SHAPE = (2, 1, 16, 8, 16)  # 4 x 2 x 4 = 32 tokens with patch 4
N = 32


def tiny(**kw):
    cfg = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, decoder_hidden_size=24,
               decoder_num_layers=2, decoder_num_heads=4, decoder_mlp_dim=48, text_width=16, text_num_layers=1,
               text_num_heads=2, embed_dim=16)  # fmt: skip
    cfg.update(kw)
    return FratMAE(**cfg)


def text(b=2):
    return PromptTokenizer()(["<tracer> 18F FDG <age> 61", "<tracer> 18F PSMA <sex> M"][:b])


@pytest.mark.parametrize("cross_modal", [True, False])
@pytest.mark.parametrize("context_align", [True, False])
def test_every_parameter_gets_a_gradient(cross_modal, context_align):
    net = tiny(cross_modal=cross_modal, context_align=context_align)
    loss_fn = FratMAELoss(infonce_weight=1.0 if context_align else 0.0)
    pet, ct = torch.rand(SHAPE), torch.rand(SHAPE)
    g = torch.Generator().manual_seed(0)
    steps = (
        [asymmetric_cross_modal_masking(2, N, 0.5, masked_modality=m, generator=g) for m in ("pet", "ct")]
        if cross_modal
        else [independent_masking(2, N, 0.5, generator=g)]
    )
    for masks in steps:
        out = net(pet, ct, masks, text() if context_align else None)
        targets = {m: patchify({"pet": pet, "ct": ct}[m], (4, 4, 4)) for m, v in masks.items() if v is not None}
        loss_fn(out, targets).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert (net.text_encoder is not None) == context_align


def test_cross_attention_direction():
    """Decoding PET: queries come from the PET encoder's (masked) tokens, keys/values from the CT encoder's
    full token set; the CT decoder is not used."""
    net = tiny(context_align=False).eval()
    pet, ct = torch.rand(SHAPE), torch.rand(SHAPE)
    masks = asymmetric_cross_modal_masking(2, N, 0.5, masked_modality="pet", generator=torch.Generator().manual_seed(0))
    seen = {}
    net.decoders["pet"].blocks[0].cross_attn.register_forward_hook(lambda m, a, o: seen.update(q=a[0], kv=a[1]))
    net.decoders["ct"].register_forward_hook(lambda m, a, o: seen.update(ct_decoder=True))
    out = net(pet, ct, masks)
    assert "ct_decoder" not in seen and "ct_pred" not in out
    assert seen["q"].shape[1] == 1 + N and seen["kv"].shape[1] == 1 + N
    ct_tokens = net.encoders["ct"](ct)["tokens"]
    dec = net.decoders["pet"]
    expected_kv = dec._with_pos(dec.context_embed(ct_tokens), (4, 2, 4))
    assert torch.allclose(seen["kv"], expected_kv, atol=1e-5)
    # the reconstruction of PET depends on the CT image ...
    out_ct2 = net(pet, ct + 1.0, masks)
    assert not torch.allclose(out["pet_pred"], out_ct2["pet_pred"])
    # ... while plain MAE decoders never look at the other modality
    mae = tiny(cross_modal=False, context_align=False).eval()
    assert all(blk.cross_attn is None for blk in mae.decoders["pet"].blocks)
    a = mae(pet, ct, masks)["pet_pred"]
    b = mae(pet, ct + 1.0, masks)["pet_pred"]
    assert torch.allclose(a, b)


def test_cross_modal_refuses_both_masked():
    net = tiny(context_align=False)
    with pytest.raises(ValueError, match="asymmetric"):
        net(torch.rand(SHAPE), torch.rand(SHAPE), independent_masking(2, N, 0.5))


def test_bf16_autocast_forward_on_cpu():
    net = tiny()
    masks = asymmetric_cross_modal_masking(2, N, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.rand(SHAPE), torch.rand(SHAPE), masks, text())
    pred = next(v for k, v in out.items() if k.endswith("_pred"))
    assert pred.dtype == torch.bfloat16 and torch.isfinite(pred.float()).all()
    assert torch.isfinite(out["text_embed"].float()).all()


def test_no_weight_decay_names_exist():
    net = tiny()
    names = dict(net.named_parameters())
    assert net.no_weight_decay() and net.no_weight_decay() <= set(names)
