import itertools
import math

import pytest
import torch

from medfm.losses import DINOLoss, IBOTPatchLoss, PanFMLoss, momentum_schedule, teacher_temp_schedule


def _naive_ce(student, teacher, center, t_temp, s_temp):
    """Per-row -sum_k q_k log p_k with plain Python arithmetic."""
    out = []
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        t_exp = [math.exp((t - c) / t_temp) for t, c in zip(t_row, center)]
        q = [e / sum(t_exp) for e in t_exp]
        s_exp = [math.exp(s / s_temp) for s in s_row]
        log_p = [math.log(e / sum(s_exp)) for e in s_exp]
        out.append(-sum(qk * lk for qk, lk in zip(q, log_p)))
    return out


def test_dino_loss_and_center_match_naive_loop():
    loss_fn = DINOLoss(5, student_temp=0.1, center_momentum=0.9)
    center = [0.0] * 5
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        s = torch.randn(4, 5, generator=g)
        t = torch.randn(4, 5, generator=g)
        temp = 0.04 + 0.01 * step
        ce = _naive_ce(s, t, center, temp, 0.1)
        loss = loss_fn(s, t, temp)
        assert loss.item() == pytest.approx(sum(ce) / 4, rel=1e-5)
        batch_mean = [sum(col) / 4 for col in zip(*t.tolist())]
        center = [0.9 * c + 0.1 * m for c, m in zip(center, batch_mean)]
        assert loss_fn.center[0].tolist() == pytest.approx(center, abs=1e-6)
    # no update when asked not to
    before = loss_fn.center.clone()
    loss_fn(torch.randn(2, 5), torch.randn(2, 5), 0.05, update_center=False)
    assert torch.equal(before, loss_fn.center)
    assert "center" in loss_fn.state_dict()


def test_dino_loss_sends_no_gradient_to_the_teacher():
    s = torch.randn(3, 6, requires_grad=True)
    t = torch.randn(3, 6, requires_grad=True)
    DINOLoss(6)(s, t, 0.04).backward()
    assert s.grad is not None and t.grad is None


def test_dino_loss_equal_sharp_distributions_reach_the_entropy_floor():
    # student logits = teacher logits scaled by the temperature ratio -> loss equals the target entropy
    t = torch.randn(3, 7)
    loss_fn = DINOLoss(7, student_temp=0.1)
    q = torch.softmax(t / 0.05, -1)
    entropy = -(q * q.log()).sum(-1).mean()
    assert loss_fn(t * 0.1 / 0.05, t, 0.05).item() == pytest.approx(entropy.item(), rel=1e-5)


def test_ibot_patch_loss_mean_over_masked_tokens_and_empty_batch():
    loss_fn = IBOTPatchLoss(4, student_temp=0.1, center_momentum=0.8)
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    ce = _naive_ce(s, t, [0.0] * 4, 0.07, 0.1)
    assert loss_fn(s, t, 0.07).item() == pytest.approx(sum(ce) / 6, rel=1e-5)
    assert torch.allclose(loss_fn.center, 0.2 * t.mean(0, keepdim=True), atol=1e-6)
    center = loss_fn.center.clone()
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = loss_fn(empty * 2, torch.zeros(0, 4), 0.07)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(empty.grad, torch.zeros(0, 4))
    assert torch.equal(center, loss_fn.center)  # nothing to average: the centre stays


def test_schedules():
    assert teacher_temp_schedule(0, 10) == pytest.approx(0.04)
    assert teacher_temp_schedule(5, 10) == pytest.approx(0.055)
    assert teacher_temp_schedule(10, 10) == teacher_temp_schedule(99, 10) == pytest.approx(0.07)
    assert teacher_temp_schedule(0, 0) == pytest.approx(0.07)
    assert momentum_schedule(0, 100) == pytest.approx(0.992)
    assert momentum_schedule(50, 100) == pytest.approx(0.996)
    assert momentum_schedule(25, 100) == pytest.approx(1.0 - 0.008 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert momentum_schedule(100, 100) == momentum_schedule(500, 100) == pytest.approx(1.0)
    values = [momentum_schedule(i, 20) for i in range(21)]
    assert all(a <= b for a, b in itertools.pairwise(values))
    with pytest.raises(ValueError, match="total_steps"):
        momentum_schedule(0, 0)


def test_panfm_loss_terms_and_zero_patch_weight():
    g = torch.Generator().manual_seed(1)
    student = {"cls_logits": torch.randn(2, 8, generator=g), "patch_logits": torch.randn(5, 6, generator=g)}
    teacher = {"cls_logits": torch.randn(2, 8, generator=g), "patch_logits": torch.randn(5, 6, generator=g)}
    loss_fn = PanFMLoss(8, 6, patch_weight=0.5)
    terms = loss_fn.forward_terms(student, teacher, 0.04)
    cls = sum(_naive_ce(student["cls_logits"], teacher["cls_logits"], [0.0] * 8, 0.04, 0.1)) / 2
    patch = sum(_naive_ce(student["patch_logits"], teacher["patch_logits"], [0.0] * 6, 0.04, 0.1)) / 5
    assert terms["cls"].item() == pytest.approx(cls, rel=1e-5)
    assert terms["patch"].item() == pytest.approx(patch, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(cls + 0.5 * patch, rel=1e-5)
    assert set(loss_fn.state_dict()) == {"cls_loss.center", "patch_loss.center"}
    no_patch = PanFMLoss(8, 6, patch_weight=0.0)
    terms = no_patch.forward_terms(student, teacher, 0.04)
    assert terms["patch"].item() == 0.0 and terms["loss"].item() == pytest.approx(cls, rel=1e-5)
    assert set(no_patch.state_dict()) == {"cls_loss.center"}


def test_ill_arguments():
    with pytest.raises(ValueError, match="student_temp"):
        DINOLoss(4, student_temp=0.0)
    with pytest.raises(ValueError, match="teacher_temp"):
        DINOLoss(4)(torch.zeros(1, 4), torch.zeros(1, 4), 0.0)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        DINOLoss(4)(torch.zeros(1, 5), torch.zeros(1, 5), 0.04)
    with pytest.raises(ValueError, match="patch_weight"):
        PanFMLoss(4, 4, patch_weight=-1.0)


def test_ibot_patch_centre_is_the_per_image_mean_of_every_teacher_token():
    loss_fn = IBOTPatchLoss(3, student_temp=0.1, center_momentum=0.9)
    every = torch.randn(9, 3)
    sample = torch.tensor([0, 0, 0, 0, 0, 1, 1, 3, 3])  # sample 2 has no token
    masked = torch.tensor([1, 5, 7])
    s = torch.randn(3, 3)
    loss = loss_fn(s, every[masked], 0.04, center_tokens=every, center_sample=sample)
    ce = _naive_ce(s, every[masked], [0.0] * 3, 0.04, 0.1)  # the loss is on the masked tokens only
    assert loss.item() == pytest.approx(sum(ce) / 3, rel=1e-5)
    per_image = [every[sample == b].mean(0) for b in (0, 1, 3)]  # iBOT: mean over each image's tokens, then images
    expected = 0.1 * sum(per_image) / 3
    assert torch.allclose(loss_fn.center, expected.view(1, 3), atol=1e-6)
    assert not torch.allclose(loss_fn.center, 0.1 * every[masked].mean(0, keepdim=True), atol=1e-3)
