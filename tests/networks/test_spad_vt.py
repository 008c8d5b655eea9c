import numpy as np
import pytest
import torch

from medfm.networks.blocks import SoftQuantizer
from medfm.networks.nets import SpadPatchDiscriminator, SpadVT
from medfm.networks.pumit_release import convert_pumit_tokenizer, read_release_checkpoint

TINY = {"channels": (8, 16, 32), "num_codes": 64, "code_dim": 32}


def _tiny() -> SpadVT:
    return SpadVT(**TINY)


# Key -> shape of PUMIT's SimpleVQTokenizer with conf/tokenizer/simple/model.yaml (soft quantizer, 1024 x 512),
# written out from reading pumit/tokenizer/{simple,quantize}.py, pumit/sac.py and mylib LayerNormNd
# (Sequential(ChannelLast, LayerNorm, ChannelFirst[, Contiguous])).
def _reference_shapes() -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {}

    def conv(key, co, ci, k, transposed=False):
        s[f"{key}.weight"] = (ci, co, k, k, k) if transposed else (co, ci, k, k, k)
        s[f"{key}.bias"] = (co,)

    def norm(key, c):
        s[f"{key}.weight"], s[f"{key}.bias"] = (c,), (c,)

    conv("encoder.0", 128, 3, 4)
    norm("encoder.1.1", 128)
    conv("encoder.3", 256, 128, 2)
    norm("encoder.4.1", 256)
    conv("encoder.6", 512, 256, 2)
    norm("encoder.7.1", 512)
    conv("encoder.9", 512, 512, 3)
    norm("encoder.10", 512)
    conv("encoder.12", 512, 512, 3)
    norm("encoder.13", 512)
    s["quantize.proj.weight"], s["quantize.proj.bias"] = (1024, 512), (1024,)
    s["quantize.embedding.weight"] = (1024, 512)
    conv("decoder.0", 512, 512, 3)
    norm("decoder.1", 512)
    conv("decoder.3", 512, 512, 3)
    norm("decoder.4", 512)
    for i, (ci, co) in zip((6, 7), ((512, 256), (256, 128))):
        conv(f"decoder.{i}.transposed_conv", co, ci, 2, transposed=True)
        conv(f"decoder.{i}.conv.0", co, co, 3)
        norm(f"decoder.{i}.conv.1", co)
    conv("decoder.8", 3, 128, 4, transposed=True)
    return s


def test_state_dict_layout_is_the_reference_checkpoints(tmp_path):
    model = SpadVT()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == _reference_shapes()
    assert model.stride == 16 and model.codebook_size == 1024
    # a Fabric checkpoint as scripts/tokenizer/main.py saves it loads with strict=True
    ref = {k: torch.randn(shape) for k, shape in _reference_shapes().items()}
    path = tmp_path / "simple-soft.ckpt"
    torch.save({"model": ref, "discriminator": {"0.weight": torch.zeros(1)}, "optimizer_g": {}, "step": 7}, path)
    report = convert_pumit_tokenizer(read_release_checkpoint(path), model)
    assert report.ok, report.summary()
    model.load_state_dict(report.converted, strict=True)
    assert torch.equal(model.encoder[1][1].weight, ref["encoder.1.1.weight"])
    assert torch.equal(model.decoder[6].conv[0].weight, ref["decoder.6.conv.0.weight"])
    assert torch.equal(model.quantize.embedding.weight, ref["quantize.embedding.weight"])


def test_discriminator_layout_is_the_references():
    d = SpadPatchDiscriminator()
    shapes = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    # SimplePatchDiscriminator([128, 256, 512], num_post_convs=1): conv/GN/act per stage, post conv, score conv
    expected = {"0.weight": (128, 3, 3, 3, 3), "1.weight": (128,), "3.weight": (256, 128, 3, 3, 3), "4.weight": (256,),
                "6.weight": (512, 256, 3, 3, 3), "7.weight": (512,), "9.weight": (512, 512, 3, 3, 3),
                "10.weight": (512,), "12.weight": (1, 512, 3, 3, 3)}  # fmt: skip
    assert {k: v for k, v in shapes.items() if k.endswith("weight")} == expected
    assert len(shapes) == 2 * len(expected)


@pytest.mark.parametrize(
    "aniso_d, depth, token_depth",
    [(0, 16, 1), (0, 32, 2), (1, 8, 1), (1, 16, 2), (2, 4, 1), (2, 8, 2), (4, 1, 1), (5, 1, 1), (5, 3, 3)],
)
def test_token_grid_and_reconstruction_shapes(aniso_d, depth, token_depth):
    model = _tiny()
    x = torch.randn(2, 3, depth, 32, 48)
    x_rec, q = model(x, aniso_d)
    assert x_rec.shape == x.shape
    assert q.z_q.shape == (2, 32, token_depth, 2, 3)
    assert q.logits.shape == q.probs.shape == (2, token_depth, 2, 3, 64)
    assert torch.allclose(q.probs.sum(-1), torch.ones(()))
    assert model.tokenize(x, aniso_d).logits.shape == q.logits.shape


def test_2d_input_defaults_to_aniso_5_and_gives_a_depth_1_reconstruction():
    model = _tiny().eval()
    x = torch.randn(2, 3, 1, 32, 32)
    x_rec, q = model(x)
    assert x_rec.shape == x.shape and q.logits.shape == (2, 1, 2, 2, 64)
    assert torch.allclose(x_rec, model(x, 5)[0])


def test_2d_image_repeated_over_depth_is_processed_slice_by_slice_at_aniso_5():
    # at aniso_d = 5 no layer of the 16-stride tokenizer mixes depth (kernels summed over depth), and GroupNorm
    # statistics of a depth-constant tensor equal those of one slice: the whole forward commutes with repetition
    model = _tiny().eval()
    x = torch.randn(2, 3, 1, 32, 32)
    x_rec, q = model(x, 5)
    x_rec3, q3 = model(x.repeat(1, 1, 3, 1, 1), 5)
    assert torch.allclose(x_rec3, x_rec.repeat(1, 1, 3, 1, 1), atol=1e-5)
    assert torch.allclose(q3.probs, q.probs.repeat(1, 3, 1, 1, 1), atol=1e-6)
    assert torch.allclose(q3.usage_loss, q.usage_loss, atol=1e-6)


@pytest.mark.parametrize("aniso_d, depth", [(0, 16), (1, 8), (2, 4), (3, 2)])
def test_strided_stages_see_a_2d_image_as_its_depth_repeated_volume(aniso_d, depth):
    # SPAD weight sharing: the patchify/downsampling convs (kernel == stride) on a 2D image equal the full 3D
    # convs on the image repeated to the depth they reduce to 1. The following k3 convs do not share this
    # property: on a depth-1 grid their zero depth padding leaves only the centre tap, while the 2D path sums
    # all three taps, so the full encoders differ from there on.
    model = _tiny()
    x = torch.randn(2, 3, 1, 32, 32)
    stages = model.encoder[:9]  # three (conv, LayerNorm, GELU) stages, stride 16
    out_2d = stages(x, 5, 0)
    out_3d = stages(x.repeat(1, 1, depth, 1, 1), aniso_d, 0)
    assert out_3d.shape == out_2d.shape == (2, 32, 1, 2, 2)
    assert torch.allclose(out_3d, out_2d, atol=1e-5)


def test_soft_quantizer_against_an_independent_computation():
    q = SoftQuantizer(in_channels=4, num_codes=5, code_dim=3)
    assert q.embedding.weight.abs().max() <= 1 / 5
    z = torch.randn(2, 4, 1, 2, 3)
    out = q(z)
    w, b, e = (t.detach().double().numpy() for t in (q.proj.weight, q.proj.bias, q.embedding.weight))
    zz = z.double().numpy().transpose(0, 2, 3, 4, 1).reshape(-1, 4)
    logits = zz @ w.T + b
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    zq = (p @ e).reshape(2, 1, 2, 3, 3).transpose(0, 4, 1, 2, 3)
    pbar = p.mean(0)
    np.testing.assert_allclose(out.logits.detach().numpy().reshape(-1, 5), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.z_q.detach().numpy(), zq, rtol=1e-5, atol=1e-7)
    assert out.usage_loss.item() == pytest.approx(float((pbar * np.log(pbar)).sum()), rel=1e-5)
    assert out.token_entropy.item() == pytest.approx(float(-(p * np.log(p)).sum(-1).mean()), rel=1e-5)


def test_every_parameter_gets_a_gradient():
    model = _tiny()
    x = torch.randn(2, 3, 16, 32, 32)
    x_rec, q = model(x, 0)
    ((x_rec - x).abs().mean() + q.usage_loss + q.token_entropy).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_cpu_bf16_autocast_forward():
    model = _tiny()
    x = torch.randn(1, 3, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_rec, q = model(x)
    assert x_rec.shape == x.shape and torch.isfinite(x_rec.float()).all()
    assert q.probs.dtype == torch.float32 and torch.isfinite(q.usage_loss)


def test_discriminator_shapes_and_slicewise_2d():
    d = SpadPatchDiscriminator(channels=(8, 16, 32), norm_groups=8).eval()
    x = torch.randn(2, 3, 1, 32, 32)
    assert d(x).shape == (2, 1, 1, 4, 4)
    assert d(torch.randn(1, 3, 16, 32, 32), 0).shape == (1, 1, 2, 4, 4)
    assert d(torch.randn(1, 3, 4, 32, 32), 2).shape == (1, 1, 2, 4, 4)
    assert torch.allclose(d(x.repeat(1, 1, 2, 1, 1), 5), d(x, 5).repeat(1, 1, 2, 1, 1), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{"channels": (8, 12), "norm_groups": 8}, {"start_stride": 3}, {"channels": ()}, {"num_codes": 0}],
)
def test_ill_arguments(kwargs):
    with pytest.raises(ValueError):
        SpadVT(**{**TINY, **kwargs})


def test_ill_inputs():
    model = _tiny()
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, 1, 24, 32))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 3, 8, 32, 32), 0)  # depth 8 cannot reach the stride-16 token grid isotropically
    with pytest.raises(ValueError, match="channels|\\(N, 3"):
        model(torch.randn(1, 1, 1, 32, 32))
    with pytest.raises(ValueError, match="aniso_d"):
        model(torch.randn(1, 3, 1, 32, 32), 7)
    with pytest.raises(ValueError, match="norm_groups"):
        SpadPatchDiscriminator(channels=(8, 16), norm_groups=16)
