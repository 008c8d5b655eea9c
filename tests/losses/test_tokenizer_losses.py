import logging
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from medfm.losses import (
    PerceptualLoss,
    SpadVTLoss,
    generator_gan_loss,
    hinge_d_loss,
    lpips_weight_shapes,
    token_entropy,
    usage_entropy_loss,
)
from medfm.networks.blocks import SoftQuantizerOutput


def test_usage_entropy_matches_hand_computation():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.4, 0.4, 0.2], [0.25, 0.25, 0.5]])
    pbar = probs.mean(0)  # [0.3625, 0.2375, 0.4]
    expected = sum(p * math.log(p) for p in pbar)
    got = usage_entropy_loss(torch.tensor(probs, dtype=torch.float32).view(2, 1, 2, 1, 3))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    uniform = torch.full((5, 8), 1 / 8)
    assert usage_entropy_loss(uniform).item() == pytest.approx(-math.log(8), rel=1e-6)
    # a never-used code contributes 0 and a finite gradient
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]], requires_grad=True)
    v = usage_entropy_loss(p)
    v.backward()
    assert v.item() == pytest.approx(0.75 * math.log(0.75) + 0.25 * math.log(0.25), rel=1e-6)
    assert torch.isfinite(p.grad).all()


def _rank_probs(rank: int) -> torch.Tensor:
    """(3, 4) code probabilities of a rank's tokens (the two ranks use different codes)."""
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(10 + rank))
    logits[:, rank] += 3.0
    return logits.softmax(-1)


def _usage_worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        p = _rank_probs(rank).requires_grad_(True)
        loss = usage_entropy_loss(p, sync=True)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": p.grad}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_usage_entropy_synced_over_two_ranks_uses_the_global_usage_with_the_local_gradient(tmp_path):
    """Value: sum_k pbar_k log pbar_k of the usage averaged over both ranks; gradient: d/dpbar = log pbar + 1 at that
    global pbar, through this rank's mean over its own N tokens only (N = 3)."""
    mp.start_processes(_usage_worker, args=(str(tmp_path),), nprocs=2, join=True, start_method="fork")  # no re-imports
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    pbar = (_rank_probs(0).double().mean(0) + _rank_probs(1).double().mean(0)) / 2
    value = float((pbar * pbar.log()).sum())
    local = float((lambda q: (q * q.log()).sum())(_rank_probs(0).double().mean(0)))
    assert abs(value - local) > 0.05  # the synced value is not the local one
    grad = ((pbar.log() + 1) / 3).expand(3, 4)
    for out in outs:
        assert out["loss"].item() == pytest.approx(value, rel=1e-6)
        torch.testing.assert_close(out["grad"].double(), grad, rtol=1e-5, atol=1e-7)


def test_token_entropy_from_logits_and_probs():
    logits = torch.randn(2, 3, 4, 6)
    p = np.exp(logits.double().numpy())
    p /= p.sum(-1, keepdims=True)
    expected = float((-(p * np.log(p)).sum(-1)).mean())
    assert token_entropy(logits).item() == pytest.approx(expected, rel=1e-5)
    assert token_entropy(logits.softmax(-1), is_logits=False).item() == pytest.approx(expected, rel=1e-5)
    one_hot = torch.eye(4)
    assert token_entropy(one_hot, is_logits=False).item() == pytest.approx(0.0, abs=1e-7)


def test_hinge_and_generator_gan_losses_closed_form():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - real) = [0, 0.5, 2]; relu(1 + fake) = [0, 1, 1.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 2.5 / 3))
    assert generator_gan_loss(fake).item() == pytest.approx(-(-2.0 + 0.0 + 0.5) / 3)


def _quant_out(usage: float, entropy: float) -> SoftQuantizerOutput:
    t = torch.zeros(1)
    return SoftQuantizerOutput(t, t, t, torch.tensor(usage), torch.tensor(entropy))


def test_spad_vt_loss_terms_and_total(caplog):
    with caplog.at_level(logging.WARNING):
        loss = SpadVTLoss()
    assert "perceptual term is off" in caplog.text
    assert loss.perceptual is None and loss.perceptual_weight == 0
    x = torch.rand(2, 3, 4, 8, 8) * 2 - 1
    x_rec = x + 0.1 * torch.randn_like(x)
    fake = torch.randn(2, 1, 2, 4, 4)
    terms = loss.forward_terms((x_rec, _quant_out(-2.0, 0.5)), x, fake_logits=fake)
    assert set(terms) == {"loss", "rec", "perceptual", "usage", "entropy", "gan"}
    rec = (x_rec - x).abs().mean().item()
    assert terms["rec"].item() == pytest.approx(rec, rel=1e-5)
    assert terms["perceptual"].item() == 0.0
    assert terms["gan"].item() == pytest.approx(-fake.mean().item(), rel=1e-5)
    expected = rec + 0.03 * -2.0 + 1.0 * 0.5 + 3e-3 * -fake.mean().item()
    assert terms["loss"].item() == pytest.approx(expected, rel=1e-5)
    no_gan = loss.forward_terms((x_rec, _quant_out(-2.0, 0.5)), x)
    assert no_gan["gan"].item() == 0.0
    assert no_gan["loss"].item() == pytest.approx(rec - 0.06 + 0.5, rel=1e-5)
    assert loss((x_rec, _quant_out(-2.0, 0.5)), x).item() == pytest.approx(no_gan["loss"].item())


def test_zero_weight_removes_a_term():
    loss = SpadVTLoss(usage_weight=0.0, entropy_weight=0.0)
    x = torch.zeros(1, 3, 1, 8, 8)
    terms = loss.forward_terms((x + 0.5, _quant_out(float("nan"), float("inf"))), x)
    assert terms["loss"].item() == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs", [{"rec_weight": -1.0}, {"gan_weight": -0.1}, {"max_perceptual_slices": 0}])
def test_ill_arguments(kwargs):
    with pytest.raises(ValueError):
        SpadVTLoss(**kwargs)


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """Random weights with the documented keys, split like the two public files (VGG16 + LPIPS linear)."""
    g = torch.Generator().manual_seed(1)
    shapes = lpips_weight_shapes()
    sd = {k: torch.randn(s, generator=g) * (0.05 if "features" in k else 1.0) for k, s in shapes.items()}
    sd.update({k: v.abs() for k, v in sd.items() if k.startswith("lin")})  # LPIPS weights are non-negative
    d = tmp_path_factory.mktemp("lpips")
    vgg = {k: v for k, v in sd.items() if k.startswith("features.")}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision's file has more; it is ignored
    torch.save(vgg, d / "vgg16.pth")
    torch.save({k: v for k, v in sd.items() if k.startswith("lin")}, d / "lpips_vgg.pth")
    return [str(d / "vgg16.pth"), str(d / "lpips_vgg.pth")], sd


def _naive_lpips(x, y, sd):
    """LPIPS written out layer by layer from the key table (independent of PerceptualLoss's module structure)."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    convs = sorted({int(k.split(".")[1]) for k in sd if k.startswith("features.")})
    stages = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]
    assert [i for stage in stages for i in stage] == convs
    total = 0.0
    hx, hy = (x - shift) / scale, (y - shift) / scale
    for j, stage in enumerate(stages):
        for i in stage:
            if j > 0 and i == stage[0]:
                hx, hy = F.max_pool2d(hx, 2), F.max_pool2d(hy, 2)
            w, b = sd[f"features.{i}.weight"], sd[f"features.{i}.bias"]
            hx, hy = F.relu(F.conv2d(hx, w, b, padding=1)), F.relu(F.conv2d(hy, w, b, padding=1))
        nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        lin = sd[f"lin{j}.model.1.weight"].view(1, -1, 1, 1)
        total += ((nx - ny).pow(2) * lin).sum(1).mean().item()
    return total


def test_perceptual_loss_from_local_weights(lpips_files):
    paths, sd = lpips_files
    lp = PerceptualLoss(paths)
    assert all(not p.requires_grad for p in lp.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    assert lp(x, x).item() == pytest.approx(0.0, abs=1e-7)
    assert lp(x, y).item() == pytest.approx(_naive_lpips(x, y, sd), rel=1e-4)
    # gradient reaches the reconstruction, not the frozen metric
    y = y.requires_grad_()
    lp(x, y).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    # grey images are replicated to RGB
    assert lp(x[:, :1], y[:, :1]).item() == pytest.approx(
        lp(x[:, :1].expand(-1, 3, -1, -1), y[:, :1].expand(-1, 3, -1, -1)).item()
    )


def test_perceptual_loss_refuses_incomplete_weights(tmp_path, lpips_files):
    paths, _ = lpips_files
    with pytest.raises(ValueError, match="lin0.model.1.weight"):
        PerceptualLoss(paths[0])  # VGG16 alone, no LPIPS linear layers
    with pytest.raises(ValueError, match="cannot read"):
        PerceptualLoss(str(tmp_path / "absent.pth"))


def test_spad_vt_loss_perceptual_over_at_most_k_slices(lpips_files):
    paths, _ = lpips_files
    loss = SpadVTLoss(lpips_weights=paths, max_perceptual_slices=2)
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    x_rec = x + 0.2 * torch.randn_like(x)
    seen = []
    original = loss.perceptual.forward

    def recording(a, b):
        seen.append(a.shape)
        return original(a, b)

    loss.perceptual.forward = recording
    loss.train()
    terms = loss.forward_terms((x_rec, _quant_out(0.0, 0.0)), x)
    assert seen[-1] == (2 * 2, 3, 16, 16)  # 2 slices of each of the 2 samples
    assert terms["perceptual"].item() > 0
    loss.eval()
    terms = loss.forward_terms((x_rec, _quant_out(0.0, 0.0)), x)
    assert seen[-1] == (2 * 5, 3, 16, 16)
    slices = [original(x[:, :, i], x_rec[:, :, i]).item() for i in range(5)]
    assert terms["perceptual"].item() == pytest.approx(sum(slices) / 5, rel=1e-4)
    assert terms["loss"].item() == pytest.approx(terms["rec"].item() + terms["perceptual"].item(), rel=1e-5)
