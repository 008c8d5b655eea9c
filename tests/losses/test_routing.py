import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medfm.losses import MIDoLLoss, RoutingConsistencyLoss, sinkhorn_knopp


def _naive_sinkhorn(scores, temperature, eps, iterations):
    """Element-by-element float64 loops: per-image max shift, then experts to B/E, images to 1."""
    s = np.asarray(scores, dtype=np.float64) / temperature
    b, e = s.shape
    q = np.zeros((b, e))
    for i in range(b):
        m = max(s[i])
        for j in range(e):
            q[i, j] = math.exp((s[i, j] - m) / eps)
    for _ in range(iterations):
        for j in range(e):
            col = sum(q[i, j] for i in range(b))
            for i in range(b):
                q[i, j] *= (b / e) / col
        for i in range(b):
            row = sum(q[i])
            for j in range(e):
                q[i, j] /= row
    return q


def _naive_floored_sinkhorn(scores, temperature, eps, iterations, floor=1e-12):
    """The reference's floored Sinkhorn as float64 loops: floor after exp and after each iteration, ``+ floor`` in
    every denominator; experts to 1/E, images to 1/B, then rows to 1."""
    s = np.asarray(scores, dtype=np.float64) / temperature
    b, e = s.shape
    q = np.array([[max(math.exp((s[i, j] - max(s[i])) / eps), floor) for j in range(e)] for i in range(b)])
    total = sum(q[i, j] for i in range(b) for j in range(e))
    q = q / (total + floor)
    for _ in range(iterations):
        for j in range(e):
            col = sum(q[i, j] for i in range(b))
            for i in range(b):
                q[i, j] = q[i, j] / (col + floor) / e
        for i in range(b):
            row = sum(q[i])
            for j in range(e):
                q[i, j] = max(q[i, j] / (row + floor) / b, floor)
    q = np.maximum(q * b, floor)
    return q / (q.sum(1, keepdims=True) + floor)


def _naive_softmax(v):
    v = np.asarray(v, dtype=np.float64)
    z = np.exp(v - v.max())
    return z / z.sum()


def test_sinkhorn_matches_naive_loops():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 3, generator=g) * 0.05
    q = sinkhorn_knopp(scores, temperature=0.5, epsilon=0.05, iterations=3)
    np.testing.assert_allclose(q.numpy(), _naive_sinkhorn(scores.numpy(), 0.5, 0.05, 3), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("b,e", [(8, 4), (10, 5), (6, 2)])
def test_sinkhorn_rows_sum_to_one_and_columns_to_b_over_e(b, e):
    g = torch.Generator().manual_seed(b + e)
    scores = torch.randn(b, e, generator=g) * 0.1
    q = sinkhorn_knopp(scores, 1.0, 0.05, iterations=3)
    torch.testing.assert_close(q.sum(1), torch.ones(b))
    assert (q.sum(0) - b / e).abs().max() < 0.25 * b / e  # 3 iterations: approximately balanced
    q = sinkhorn_knopp(scores, 1.0, 0.05, iterations=500)
    torch.testing.assert_close(q.sum(1), torch.ones(b))
    torch.testing.assert_close(q.sum(0), torch.full((e,), b / e), atol=1e-3, rtol=0)


def test_sinkhorn_rebalances_a_collapsed_router_at_the_shipped_settings():
    # 32 images, 5 experts, every image prefers expert 0 by 1.0; teacher temperature 0.04, epsilon 0.05, 3 iterations:
    # exp(-1 / 0.002) underflows to 0 in float32, so without the floor experts 1-4 would keep columns of zeros.
    scores = torch.zeros(32, 5)
    scores[:, 0] = 1.0
    q = sinkhorn_knopp(scores, temperature=0.04, epsilon=0.05, iterations=3)
    torch.testing.assert_close(q.sum(0), torch.full((5,), 32 / 5), atol=1e-3, rtol=0)  # 6.4 each
    torch.testing.assert_close(q.sum(1), torch.ones(32))
    torch.testing.assert_close(q, torch.full((32, 5), 0.2), atol=1e-4, rtol=0)  # identical images: uniform rows
    # the routing loss's target is then uniform: -sum_e a_S[e] log(1/5) = log 5 for any student routing
    student = [torch.randn(32, 5), torch.randn(32, 5), torch.randn(32, 5)]
    value = RoutingConsistencyLoss(0.1, None, 0.05, 3)(student, [scores, scores], teacher_temp=0.04)
    assert value.item() == pytest.approx(math.log(5), rel=1e-4)


def test_sinkhorn_partial_collapse_matches_floored_loops():
    # 20 images prefer expert 0, 12 expert 1 (margins 0.6-1.4); experts 2-4 are nobody's favourite
    g = torch.Generator().manual_seed(0)
    scores = torch.zeros(32, 5)
    scores[:20, 0] = 1.0 + 0.4 * torch.rand(20, generator=g)
    scores[20:, 1] = 0.6 + 0.4 * torch.rand(12, generator=g)
    q = sinkhorn_knopp(scores, temperature=0.04, epsilon=0.05, iterations=3)
    expected = _naive_floored_sinkhorn(scores.numpy(), 0.04, 0.05, 3)
    np.testing.assert_allclose(q.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert (q.sum(0)[2:] > 4.0).all()  # the unused experts receive a real share of the batch


def test_sinkhorn_at_the_shipped_settings_balances_mass_not_top_experts():
    # 16 images, 5 experts: 6 prefer expert 0, 6 expert 1, 4 expert 2 by 0.3 (noise 0.05, as a freshly initialised
    # gate on well-separated features); experts 3 and 4 are nobody's favourite. At r / (0.04 * 0.05) their entries
    # are floored or near it for every image, so 3 iterations give them their 16 / 5 of the mass as a thin, even
    # share of every row, and no image's largest target entry moves: the routing loss (whose minimiser puts the
    # student on each row's largest entry) keeps experts 3 and 4 unused.
    g = torch.Generator().manual_seed(0)
    favourite = torch.tensor([0] * 6 + [1] * 6 + [2] * 4)
    scores = 0.05 * torch.randn(16, 5, generator=g)
    scores[torch.arange(16), favourite] += 0.3
    q = sinkhorn_knopp(scores, temperature=0.04, epsilon=0.05, iterations=3)
    expected = _naive_floored_sinkhorn(scores.numpy(), 0.04, 0.05, 3)
    np.testing.assert_allclose(q.numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(expected.sum(0), np.full(5, 16 / 5), atol=0.4)  # the mass is about equipartitioned
    assert (expected.argmax(1) == favourite.numpy()).all()  # ... the top experts are not: counts 6, 6, 4, 0, 0
    assert expected[:, 3:].max() < 0.35


def test_sinkhorn_easy_case_keeps_a_balanced_hard_assignment():
    # 30 images, 5 experts, 6 images prefer each expert by 1.0: already equipartitioned, stays one-hot
    scores = torch.zeros(30, 5)
    favourite = torch.arange(30) % 5
    scores[torch.arange(30), favourite] = 1.0
    q = sinkhorn_knopp(scores, temperature=0.04, epsilon=0.05, iterations=3)
    torch.testing.assert_close(q, torch.nn.functional.one_hot(favourite, 5).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(q.sum(0), torch.full((5,), 6.0))


def test_sinkhorn_temperature_and_row_shift():
    scores = torch.randn(5, 3)
    torch.testing.assert_close(sinkhorn_knopp(scores, 0.04), sinkhorn_knopp(scores / 0.04, 1.0))
    shifted = scores + torch.randn(5, 1) * 100  # a per-image constant changes nothing
    torch.testing.assert_close(sinkhorn_knopp(shifted, 2.0), sinkhorn_knopp(scores, 2.0), atol=1e-5, rtol=1e-4)
    assert torch.isfinite(sinkhorn_knopp(scores * 1e4, 0.04)).all()


@pytest.mark.parametrize("kw", [{"temperature": 0.0}, {"epsilon": -1.0}, {"iterations": 0}])
def test_sinkhorn_ill_arg(kw):
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.randn(4, 2), **kw)


def _views(v=4, g=2, b=5, k=7, e=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student = {
        "logits": [torch.randn(b, k, generator=gen, requires_grad=True) for _ in range(v)],
        "router_logits": [torch.randn(b, e, generator=gen, requires_grad=True) for _ in range(v)],
    }
    teacher = {
        "logits": [torch.randn(b, k, generator=gen) for _ in range(g)],
        "router_logits": [torch.randn(b, e, generator=gen) * 0.05 for _ in range(g)],
    }
    return student, teacher


def _naive_route(student, teacher, s_temp, t_temp, eps, iters):
    targets = [_naive_floored_sinkhorn(t.numpy(), t_temp, eps, iters) for t in teacher]
    total, n = 0.0, 0
    for gi, tgt in enumerate(targets):
        for vi, s in enumerate(student):
            if vi == gi:
                continue
            s = s.detach().numpy()
            ce = [
                -sum(a * math.log(max(t, 1e-12)) for a, t in zip(_naive_softmax(s[i] / s_temp), tgt[i]))
                for i in range(len(s))
            ]
            total += sum(ce) / len(ce)
            n += 1
    return total / n


def _naive_cst(student, teacher, center, s_temp, t_temp):
    total, n = 0.0, 0
    for gi, t in enumerate(teacher):
        for vi, s in enumerate(student):
            if vi == gi:
                continue
            rows = []
            for i in range(t.shape[0]):
                q = _naive_softmax((t[i].numpy() - center) / t_temp)
                logp = np.log(_naive_softmax(s[i].detach().numpy() / s_temp))
                rows.append(-(q * logp).sum())
            total += np.mean(rows)
            n += 1
    return total / n


@pytest.mark.parametrize("fixed", [None, 0.5])
def test_routing_loss_matches_naive_loops(fixed):
    student, teacher = _views()
    loss = RoutingConsistencyLoss(student_temp=0.1, teacher_temp=fixed, epsilon=0.05, iterations=3)
    value = loss(student["router_logits"], teacher["router_logits"], teacher_temp=0.04)
    expected = _naive_route(student["router_logits"], teacher["router_logits"], 0.1, fixed or 0.04, 0.05, 3)
    assert value.item() == pytest.approx(expected, rel=1e-4)
    value.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student["router_logits"])


def test_midol_loss_terms_match_naive_and_centre_moves():
    student, teacher = _views()
    loss = MIDoLLoss(out_dim=7, student_temp=0.1, center_momentum=0.9, route_weight=0.5)
    terms = loss.forward_terms(student, teacher, teacher_temp=0.04)
    assert terms["cst"].item() == pytest.approx(
        _naive_cst(student["logits"], teacher["logits"], 0.0, 0.1, 0.04), rel=1e-4
    )
    route = _naive_route(student["router_logits"], teacher["router_logits"], 0.1, 0.04, 0.05, 3)
    assert terms["route"].item() == pytest.approx(route, rel=1e-4)
    assert terms["loss"].item() == pytest.approx(terms["cst"].item() + 0.5 * route, rel=1e-5)
    mean_t = torch.cat(teacher["logits"]).mean(0)
    torch.testing.assert_close(loss.dino.center[0], 0.1 * mean_t)
    # the second call uses the moved centre
    terms2 = loss.forward_terms(student, teacher, teacher_temp=0.04)
    naive2 = _naive_cst(student["logits"], teacher["logits"], 0.1 * mean_t.numpy(), 0.1, 0.04)
    assert terms2["cst"].item() == pytest.approx(naive2, rel=1e-4)


def test_weight_zero_removes_a_term():
    student, teacher = _views()
    loss = MIDoLLoss(out_dim=7, cst_weight=0.0)
    terms = loss.forward_terms(student, teacher, 0.04)
    assert terms["cst"].item() == 0.0 and terms["loss"].item() == pytest.approx(terms["route"].item())
    assert loss.dino.center.abs().sum() == 0
    with pytest.raises(ValueError):
        MIDoLLoss(7, cst_weight=0.0, route_weight=0.0)
    with pytest.raises(ValueError):
        MIDoLLoss(7)(  # one student crop only: no pair v != g
            {"logits": student["logits"][:1], "router_logits": student["router_logits"][:1]},
            {"logits": teacher["logits"][:1], "router_logits": teacher["router_logits"][:1]},
            0.04,
        )


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student, teacher = _views(b=8, seed=0)
        half = slice(rank * 4, rank * 4 + 4)

        def part(d):
            return {k: [t.detach()[half].clone().requires_grad_(t.requires_grad) for t in v] for k, v in d.items()}

        s, t = part(student), part(teacher)
        loss = MIDoLLoss(out_dim=7)
        terms = loss.forward_terms(s, t, 0.04)
        q = sinkhorn_knopp(t["router_logits"][0], 0.5, 0.05, 3)
        torch.save({"terms": {k: v.detach() for k, v in terms.items()}, "q": q, "center": loss.dino.center}, out_file)
    finally:
        dist.destroy_process_group()


def _spawn_target(rank, world, tmp):
    _worker(rank, world, f"{tmp}/init", f"{tmp}/rank{rank}.pt")


def test_distributed_two_processes_match_one_process(tmp_path):
    mp.start_processes(_spawn_target, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    student, teacher = _views(b=8, seed=0)
    loss = MIDoLLoss(out_dim=7)
    ref = loss.forward_terms(student, teacher, 0.04)
    for key in ("loss", "cst", "route"):  # DDP averages the ranks' gradients: the mean of the rank losses
        mean = (outs[0]["terms"][key] + outs[1]["terms"][key]) / 2
        torch.testing.assert_close(mean, ref[key].detach(), atol=1e-5, rtol=1e-5)
    q_ref = sinkhorn_knopp(teacher["router_logits"][0], 0.5, 0.05, 3)
    torch.testing.assert_close(torch.cat([outs[0]["q"], outs[1]["q"]]), q_ref, atol=1e-6, rtol=1e-5)
    for o in outs:
        torch.testing.assert_close(o["center"], loss.dino.center)
