import pytest
import torch
from medfm.networks.blocks import MoEProjector
from medfm.networks.nets.midol import MIDoLHead, MIDoLSelfDistill, midol_backbone_state
from torch import nn


def _naive_moe(moe: MoEProjector, x: torch.Tensor) -> torch.Tensor:
    """Per-sample loop: softmax gate, the k largest by a full sort, (re)normalised weights."""
    out = []
    for xb in x:
        p = torch.softmax(moe.gate.weight.detach().double() @ xb.double(), 0)
        order = torch.sort(p, descending=True).indices[: moe.top_k]
        w = p[order] / p[order].sum() if moe.normalize_gate else p[order]
        out.append(sum(float(wi) * moe.experts[int(e)](xb[None])[0] for wi, e in zip(w, order)))
    return torch.stack(out)


@pytest.mark.parametrize("num_experts,top_k,normalize", [(5, 1, True), (4, 4, True), (4, 2, True), (3, 2, False)])
def test_moe_matches_per_sample_loop(num_experts, top_k, normalize):
    torch.manual_seed(0)
    moe = MoEProjector(in_dim=6, hidden_dim=10, num_experts=num_experts, top_k=top_k, normalize_gate=normalize)
    nn.init.normal_(moe.gate.weight, std=1.0)  # spread the gate so every expert gets images
    x = torch.randn(9, 6)
    out, logits = moe(x)
    assert out.shape == (9, 6) and logits.shape == (9, num_experts) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, x @ moe.gate.weight.T)
    torch.testing.assert_close(out, _naive_moe(moe, x).float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_each_image_goes_to_exactly_k_experts(top_k):
    torch.manual_seed(1)
    moe = MoEProjector(in_dim=4, hidden_dim=8, num_experts=3, top_k=top_k)
    x = torch.randn(7, 4)
    seen = []
    hooks = [e.register_forward_hook(lambda m, inp, out: seen.append(inp[0])) for e in moe.experts]
    moe(x)
    for h in hooks:
        h.remove()
    assert sum(s.shape[0] for s in seen) == 7 * top_k
    # every image appears in exactly k expert inputs
    counts = [sum(int((s == xb).all(1).sum()) for s in seen) for xb in x]
    assert counts == [top_k] * 7
    _, index, weights = moe.route(x)
    assert all(len(set(row)) == top_k for row in index.tolist())
    torch.testing.assert_close(weights.sum(1), torch.ones(7))


def test_unused_expert_still_gets_a_zero_gradient():
    moe = MoEProjector(in_dim=4, hidden_dim=8, num_experts=3, top_k=1)
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0, 0] = 10.0  # every positive x[:, 0] routes to expert 0
    x = torch.rand(5, 4) + 0.1
    out, _ = moe(x)
    out.sum().backward()
    for name, p in moe.experts.named_parameters():
        assert p.grad is not None, name
    assert moe.experts[0][0].weight.grad.abs().sum() > 0
    assert moe.experts[1][0].weight.grad.abs().sum() == 0 and moe.experts[2][2].bias.grad.abs().sum() == 0


def test_bf16_autocast_keeps_router_in_float32():
    moe = MoEProjector(in_dim=8, hidden_dim=16, num_experts=3, top_k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, logits = moe(torch.randn(4, 8))
    assert logits.dtype == torch.float32 and out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("kw", [{"top_k": 0}, {"top_k": 4, "num_experts": 3}, {"num_experts": 0}, {"in_dim": 0}])
def test_ill_arg(kw):
    with pytest.raises(ValueError):
        MoEProjector(**{"in_dim": 4, "hidden_dim": 8, **kw})
    with pytest.raises(ValueError):
        MoEProjector(4, 8)(torch.randn(2, 5))


@pytest.mark.parametrize("bottleneck", [None, 3])
def test_head_is_moe_then_normalised_weight_norm_layer(bottleneck):
    torch.manual_seed(2)
    head = MIDoLHead(6, num_experts=3, top_k=2, out_dim=11, hidden_dim=8, bottleneck_dim=bottleneck)
    x = torch.randn(4, 6)
    logits, router = head(x)
    y, _ = head.moe(x)
    if bottleneck is not None:
        y = head.last_layer.mlp(y)
    v = head.last_layer.last_v
    expected = (y / y.norm(dim=1, keepdim=True)) @ (v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(logits, expected)
    assert router.shape == (4, 3)
    assert head.last_layer_parameters() == [v]
    assert len(MIDoLHead(6, 3, 1, 11, 8, norm_last_layer=False).last_layer_parameters()) == 2


def _backbone():
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_self_distill_multicrop_equals_per_crop_and_state_dict():
    torch.manual_seed(3)
    model = MIDoLSelfDistill(_backbone(), 5, num_experts=3, top_k=1, out_dim=7, hidden_dim=6)
    crops = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)]
    out = model(crops)
    assert len(out["logits"]) == 4 and len(out["router_logits"]) == 4
    for c, lg, r in zip(crops, out["logits"], out["router_logits"]):
        lg1, r1 = model.student.head(model.student.backbone(c))
        torch.testing.assert_close(lg, lg1)
        torch.testing.assert_close(r, r1)
    t = model.forward_teacher(crops[:2])
    assert not t["logits"][0].requires_grad
    torch.testing.assert_close(t["logits"][0], out["logits"][0].detach())  # teacher starts as the student's copy
    keys = model.state_dict().keys()
    assert all(k.startswith(("student.", "teacher.")) for k in keys)
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.train()
    assert not model.teacher.training and model.student.training
    bb = midol_backbone_state(model.state_dict())
    assert set(bb) == set(_backbone().state_dict())
