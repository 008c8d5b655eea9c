import pytest
import torch
from torch import nn

from medfm.losses import MIDoLLoss
from medfm.networks.blocks import MoEProjector
from medfm.networks.nets.midol import MIDoLHead, MIDoLSelfDistill, midol_backbone_state


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
    moe.eval()  # no gate noise
    nn.init.normal_(moe.gate.weight, std=1.0)  # spread the gate so every expert gets images
    x = torch.randn(9, 6)
    out, logits = moe(x)
    assert out.shape == (9, 6) and logits.shape == (9, num_experts) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, x @ moe.gate.weight.T)
    torch.testing.assert_close(out, _naive_moe(moe, x).float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_each_image_goes_to_exactly_k_experts(top_k):
    torch.manual_seed(1)
    moe = MoEProjector(in_dim=4, hidden_dim=8, num_experts=3, top_k=top_k, normalize_gate=True)
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


def _naive_gate_grad(moe: MoEProjector, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d/dW_g of sum((out - target)^2) with out_b = sum_{e in S_b} p_e f_e(x_b), p = softmax(W_g x_b), by the
    chain rule per image: dL/dlogit_j = sum_{e in S} (dL/dout_b . f_e(x_b)) p_e (delta_ej - p_j)."""
    w = moe.gate.weight.detach().double()
    grad = torch.zeros_like(w)
    with torch.no_grad():
        for xb, tb in zip(x.double(), target.double()):
            p = torch.softmax(w @ xb, 0)
            chosen = torch.sort(p, descending=True).indices[: moe.top_k].tolist()
            f = {e: moe.experts[e](xb[None].float())[0].double() for e in chosen}
            out = sum(p[e] * f[e] for e in chosen)
            g_out = 2 * (out - tb)
            for j in range(len(p)):
                d_logit = sum(float(g_out @ f[e]) * float(p[e]) * (float(e == j) - float(p[j])) for e in chosen)
                grad[j] += d_logit * xb
    return grad


@pytest.mark.parametrize("top_k", [1, 2])
def test_gate_learns_from_the_task_loss_by_default(top_k):
    # default combination (reference: no renormalisation), eval mode (no gate noise): the gate's gradient from a
    # task loss on the output equals the chain rule written out per image
    torch.manual_seed(4)
    moe = MoEProjector(in_dim=6, hidden_dim=10, num_experts=5, top_k=top_k).eval()
    nn.init.normal_(moe.gate.weight, std=0.5)
    nn.init.normal_(moe.experts[0][2].weight, std=0.5)
    x, target = torch.randn(8, 6), torch.randn(8, 6)
    ((moe(x)[0] - target) ** 2).sum().backward()
    expected = _naive_gate_grad(moe, x, target)
    assert expected.norm() > 1e-2
    torch.testing.assert_close(moe.gate.weight.grad.double(), expected, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("normalize", [False, True])
def test_dino_loss_gives_the_gate_no_gradient_under_top1(top_k, normalize):
    # the routing ablation (route_weight 0): MIDoLHead L2-normalises the MoE output, and under top-1 that output is
    # p_e * f_e(x), so normalise(p_e f_e) = normalise(f_e) and L_cst does not depend on the gate (d/dW_g = 0 exactly;
    # rounding only), renormalised weights or not. Under top-2 the ratio p_1 : p_2 survives the norm.
    torch.manual_seed(5)
    model = MIDoLSelfDistill(
        _backbone(), 5, num_experts=3, top_k=top_k, out_dim=7, hidden_dim=6, normalize_gate=normalize
    )
    model = model.double().eval()
    crops = [torch.randn(4, 3, 8, 8).double(), torch.randn(4, 3, 8, 8).double(), torch.randn(4, 3, 4, 4).double()]
    MIDoLLoss(out_dim=7, route_weight=0.0)(model(crops), model.forward_teacher(crops[:2]), 0.04).backward()
    gate = model.student.head.moe.gate.weight.grad.norm().item()
    experts = sum(p.grad.norm().item() for p in model.student.head.moe.experts.parameters())
    assert experts > 1.0
    if top_k == 1:
        assert gate < 1e-10 * experts
    else:
        assert gate > 1e-6 * experts
    # the same through the head alone: scaling the gate keeps every image's top-1 expert, and the top-1 outputs
    head = model.student.head
    x = torch.randn(6, 5).double()
    with torch.no_grad():
        before = head(x)[0]
        head.moe.gate.weight.mul_(1.5)
        after = head(x)[0]
    change = float((after - before).abs().max())  # the MoE sums in float32: rounding ~1e-8
    assert change < 1e-6 if top_k == 1 else change > 1e-3


def test_gate_noise_only_in_training_and_at_scale_one_over_e():
    torch.manual_seed(6)
    e = 5
    moe = MoEProjector(in_dim=4, hidden_dim=8, num_experts=e, top_k=e)  # defaults: noise 1.0, no renormalisation
    nn.init.zeros_(moe.gate.weight)  # clean logits 0: the weights are softmax(noise)
    x = torch.randn(4000, 4)
    logits, _, weights = moe.route(x)
    assert torch.equal(logits, torch.zeros(4000, e))  # the returned router logits carry no noise
    log_w = weights.log()  # the order of the experts does not matter for the spread
    centred = log_w - log_w.mean(1, keepdim=True)  # = noise - its mean over experts
    sd = (centred.var() / (1 - 1 / e)).sqrt()
    assert sd.item() == pytest.approx(1.0 / e, rel=0.05)
    moe.eval()
    _, index, weights = moe.route(x)
    torch.testing.assert_close(weights, torch.full((4000, e), 1 / e))  # eval: deterministic, noise-free
    moe.train()
    nn.init.normal_(moe.gate.weight, std=0.3)
    a, b = moe.route(x)[1], moe.route(x)[1]
    assert not torch.equal(a[:, 0], b[:, 0])  # training: the selection is drawn
    moe.gate_noise = 0.0
    assert torch.equal(moe.route(x)[1], moe.route(x)[1])
    with pytest.raises(ValueError):
        MoEProjector(4, 8, gate_noise=-1.0)


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
    head = MIDoLHead(6, num_experts=3, top_k=2, out_dim=11, hidden_dim=8, bottleneck_dim=bottleneck).eval()
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
    free = MIDoLHead(6, num_experts=3, top_k=1, out_dim=11, hidden_dim=8, norm_last_layer=False)
    assert len(free.last_layer_parameters()) == 2


def _backbone():
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_self_distill_multicrop_equals_per_crop_and_state_dict():
    torch.manual_seed(3)
    model = MIDoLSelfDistill(_backbone(), 5, num_experts=3, top_k=1, out_dim=7, hidden_dim=6)
    crops = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)]
    model.eval()  # deterministic: no gate noise
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
    model.train()  # the teacher follows the pair's mode (reference), or stays in eval with teacher_train_mode=False
    assert model.teacher.training and model.student.training
    model.eval()
    assert not model.teacher.training and not model.student.training
    fixed = MIDoLSelfDistill(_backbone(), 5, num_experts=3, out_dim=7, hidden_dim=6, teacher_train_mode=False)
    assert fixed.train().student.training and not fixed.teacher.training
    bb = midol_backbone_state(model.state_dict())
    assert set(bb) == set(_backbone().state_dict())


def test_teacher_targets_are_stochastic_in_training_as_the_reference():
    # the teacher follows the pair into train mode: gate noise (and drop-path) make its targets vary between calls
    torch.manual_seed(7)
    model = MIDoLSelfDistill(_backbone(), 5, num_experts=3, top_k=1, out_dim=7, hidden_dim=6).train()
    crops = [torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)]
    a, b = model.forward_teacher(crops)["logits"][0], model.forward_teacher(crops)["logits"][0]
    assert not torch.allclose(a, b)
    model.eval()
    torch.testing.assert_close(model.forward_teacher(crops)["logits"][0], model.forward_teacher(crops)["logits"][0])
    fixed = MIDoLSelfDistill(_backbone(), 5, num_experts=3, out_dim=7, hidden_dim=6, teacher_train_mode=False).train()
    torch.testing.assert_close(fixed.forward_teacher(crops)["logits"][0], fixed.forward_teacher(crops)["logits"][0])
