import math

import pytest
import torch

from medfm.losses import FratMAELoss, InfoNCELoss, masked_mse


def test_masked_mse_counts_only_masked_tokens():
    pred, target = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    naive, count = 0.0, 0
    for b in range(2):
        for n in range(6):
            if mask[b, n]:
                naive += sum((pred[b, n, p] - target[b, n, p]).item() ** 2 for p in range(4)) / 4
                count += 1
    assert masked_mse(pred, target, mask).item() == pytest.approx(naive / count, rel=1e-5)
    # changing visible tokens' predictions changes nothing
    pred2 = pred.clone()
    pred2[~mask] += 100.0
    assert masked_mse(pred2, target, mask).item() == pytest.approx(naive / count, rel=1e-5)


def test_masked_mse_norm_pix():
    pred, target = torch.randn(1, 3, 8), torch.randn(1, 3, 8) * 5 + 2
    mask = torch.ones(1, 3, dtype=torch.bool)
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = ((pred - t) ** 2).mean().item()
    assert masked_mse(pred, target, mask, norm_pix=True).item() == pytest.approx(expected, rel=1e-5)


def _naive_infonce(a, b, tau, symmetric):
    n = a.shape[0]
    a = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in a.tolist()]
    b = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in b.tolist()]
    dot = [[sum(x * y for x, y in zip(a[i], b[j])) / tau for j in range(n)] for i in range(n)]
    i2t = -sum(dot[i][i] - math.log(sum(math.exp(dot[i][j]) for j in range(n))) for i in range(n)) / n
    if not symmetric:
        return i2t
    t2i = -sum(dot[j][j] - math.log(sum(math.exp(dot[i][j]) for i in range(n))) for j in range(n)) / n
    return 0.5 * (i2t + t2i)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_infonce_matches_naive_loop(symmetric, tau):
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    got = InfoNCELoss(tau, symmetric)(a, b).item()
    assert got == pytest.approx(_naive_infonce(a, b, tau, symmetric), rel=1e-4)


def test_infonce_prefers_aligned_pairs():
    a = torch.randn(8, 16)
    loss = InfoNCELoss(0.1)
    assert loss(a, a).item() < loss(a, torch.randn(8, 16)).item()


def test_fratmae_loss_terms_and_zero_weight():
    preds = {
        "pet_pred": torch.randn(2, 4, 3),
        "pet_mask": torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool),
        "image_embed": torch.randn(2, 5),
        "text_embed": torch.randn(2, 5),
    }
    targets = {"pet": torch.randn(2, 4, 3)}
    terms = FratMAELoss(infonce_weight=0.5, temperature=0.1).forward_terms(preds, targets)
    mse = masked_mse(preds["pet_pred"], targets["pet"], preds["pet_mask"])
    nce = InfoNCELoss(0.1)(preds["image_embed"], preds["text_embed"])
    assert terms["loss"].item() == pytest.approx((mse + 0.5 * nce).item(), rel=1e-6)
    off = FratMAELoss(infonce_weight=0.0)
    assert off.infonce is None
    assert set(off.forward_terms(preds, targets)) == {"loss", "mse"}


def test_fratmae_loss_ill_args():
    with pytest.raises(ValueError, match="infonce_weight"):
        FratMAELoss(infonce_weight=-1)
    with pytest.raises(ValueError, match="context_align"):
        preds = {"pet_pred": torch.zeros(1, 2, 2), "pet_mask": torch.ones(1, 2, dtype=torch.bool)}
        FratMAELoss(1.0).forward_terms(preds, {"pet": torch.zeros(1, 2, 2)})
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(0.0)
