"""InfoNCE: duplicate prompts are not negatives, and under DDP the loss is the global batch's (2 gloo ranks)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medfm.losses import FratMAELoss, InfoNCELoss
from medfm.losses.infonce import duplicate_pairs

TAU = 0.07  # train.json's temperature


def _naive(a, b, groups, tau, symmetric):
    """Loop over pairs; a negative j of anchor i is skipped when j != i has i's group."""
    n = a.shape[0]
    a = torch.nn.functional.normalize(a.double(), dim=-1).tolist()
    b = torch.nn.functional.normalize(b.double(), dim=-1).tolist()
    s = [[sum(x * y for x, y in zip(a[i], b[j])) / tau for j in range(n)] for i in range(n)]
    same = lambda i, j: i != j and groups is not None and groups[i] == groups[j]  # noqa: E731
    i2t = -sum(s[i][i] - math.log(sum(math.exp(s[i][j]) for j in range(n) if not same(i, j))) for i in range(n)) / n
    t2i = -sum(s[j][j] - math.log(sum(math.exp(s[i][j]) for i in range(n) if not same(i, j))) for j in range(n)) / n
    return 0.5 * (i2t + t2i) if symmetric else i2t


@pytest.mark.parametrize("symmetric", [True, False])
def test_duplicate_prompts_are_not_negatives(symmetric):
    torch.manual_seed(0)
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    groups = [0, 1, 0, 2, 1, 0]
    tokens = torch.tensor([[5, g, 7] for g in groups])  # prompts as token rows: equal rows = same prompt
    got = InfoNCELoss(TAU, symmetric)(a, b, tokens).item()
    assert got == pytest.approx(_naive(a, b, groups, TAU, symmetric), rel=1e-5)
    assert got != pytest.approx(_naive(a, b, None, TAU, symmetric), rel=1e-3)
    assert InfoNCELoss(TAU, symmetric)(a, b).item() == pytest.approx(_naive(a, b, None, TAU, symmetric), rel=1e-5)


def test_all_identical_prompts_give_no_signal_instead_of_log_n():
    """Every prompt the same: the text embeddings are equal, an unmasked loss is the constant log N with no useful
    gradient; with duplicates masked the batch has no negative and contributes exactly 0."""
    a = torch.randn(8, 16, requires_grad=True)
    b = torch.randn(1, 16).expand(8, 16)
    unmasked = InfoNCELoss(TAU, symmetric=False)(a, b)
    assert unmasked.item() == pytest.approx(math.log(8), rel=1e-5)
    masked = InfoNCELoss(TAU)(a, b, torch.zeros(8, 4, dtype=torch.long))
    assert masked.item() == 0.0


def test_duplicate_pairs_and_errors():
    pairs = duplicate_pairs(torch.tensor([[1, 2], [1, 3], [1, 2]]))
    assert pairs.tolist() == [[False, False, True], [False, False, False], [True, False, False]]
    with pytest.raises(ValueError, match="one row per sample"):
        InfoNCELoss()(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(2, dtype=torch.long))


def test_fratmae_loss_reads_prompt_tokens_from_targets():
    preds = {
        "pet_pred": torch.randn(4, 3, 2), "pet_mask": torch.ones(4, 3, dtype=torch.bool),
        "image_embed": torch.randn(4, 5), "text_embed": torch.randn(4, 5),
    }  # fmt: skip
    tokens = torch.tensor([[1, 2], [1, 2], [3, 4], [1, 2]])
    terms = FratMAELoss(temperature=TAU).forward_terms(preds, {"pet": torch.randn(4, 3, 2), "text_tokens": tokens})
    want = InfoNCELoss(TAU)(preds["image_embed"], preds["text_embed"], tokens)
    assert terms["infonce"].item() == pytest.approx(want.item(), rel=1e-6)


def _batch():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    tokens = torch.tensor([[0], [1], [0], [2], [1], [3]])  # duplicates across the two ranks' halves
    return a, b, tokens


def _worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        a, b, tokens = _batch()
        rows = slice(3 * rank, 3 * rank + 3)
        a_local = a[rows].clone().requires_grad_(True)
        loss = InfoNCELoss(TAU)(a_local, b[rows], tokens[rows])
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": a_local.grad}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_loss_and_gradient_of_one_process_on_the_whole_batch(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=2, join=True, start_method="fork")  # no re-imports
    outs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    a, b, tokens = _batch()
    a = a.clone().requires_grad_(True)
    ref = InfoNCELoss(TAU)(a, b, tokens)
    ref.backward()
    for r, out in enumerate(outs):
        torch.testing.assert_close(out["loss"], ref.detach(), rtol=1e-5, atol=1e-6)  # the global loss on every rank
        # each rank gets world_size x its rows' gradient; DDP's average over ranks makes it the global gradient
        torch.testing.assert_close(out["grad"] / 2, a.grad[3 * r : 3 * r + 3], rtol=1e-4, atol=1e-6)
