import itertools

import pytest
import torch

from medfm.masking import (
    organ_attention_share,
    organ_masking,
    random_organ_mask,
    sample_organ_mask,
    sgm_probabilities,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sgm_probabilities_match_hand_computation():
    attention = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.2, 0.0, 0.6, 0.2], [0.0, 0.0, 0.0, 0.0]])
    present = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    p = sgm_probabilities(attention, present, floor=0.2)
    # row 0: 0.8 a + 0.2 / 3; row 1: attention renormalised over present (sums to 1 already)
    expected0 = [0.8 * 0.5 + 0.2 / 3, 0.8 * 0.3 + 0.2 / 3, 0.8 * 0.2 + 0.2 / 3, 0.0]
    expected1 = [0.8 * 0.2 + 0.2 / 3, 0.0, 0.8 * 0.6 + 0.2 / 3, 0.8 * 0.2 + 0.2 / 3]
    assert torch.allclose(p[0], torch.tensor(expected0), atol=1e-6)
    assert torch.allclose(p[1], torch.tensor(expected1), atol=1e-6)
    assert torch.allclose(p[2], torch.tensor([0.0, 0.5, 0.5, 0.0]), atol=1e-6)  # no attention -> uniform
    assert torch.allclose(p.sum(1), torch.ones(3), atol=1e-6)
    # attention on a missing organ is dropped before renormalising
    p2 = sgm_probabilities(torch.tensor([[2.0, 1.0, 1.0]]), torch.tensor([[0, 1, 1]], dtype=torch.bool), 0.0)
    assert torch.allclose(p2, torch.tensor([[0.0, 0.5, 0.5]]))
    assert torch.allclose(sgm_probabilities(attention, present, 1.0)[0], torch.tensor([1 / 3] * 3 + [0.0]))


def test_never_all_present_masked_single_organ_never_masked_missing_never_masked():
    n_rows = 3000
    g = _gen(1)
    present = torch.rand(n_rows, 7, generator=g) < 0.5
    present[torch.arange(n_rows), torch.randint(0, 7, (n_rows,), generator=g)] = True
    present[:50] = False
    present[:50, 3] = True  # 50 single-organ subjects
    probs = sgm_probabilities(torch.rand(n_rows, 7, generator=g), present, 0.2)
    mask = sample_organ_mask(probs, present, (0.1, 0.9), _gen(2))
    n = present.sum(1)
    m = mask.sum(1)
    assert not (mask & ~present).any()
    assert (m <= n - 1).all() and (m[:50] == 0).all()
    # m = round(r n), r in [0.1, 0.9], clamped to n - 1
    lo = torch.round(0.1 * n).clamp(max=n - 1)
    hi = torch.minimum(torch.round(0.9 * n), n - 1)
    assert ((m >= lo) & (m <= hi)).all()
    assert (m[n >= 6] > 0).all() and (n >= 6).any()


@pytest.mark.parametrize("n_present, ratio", [(5, 0.5), (4, 0.3), (2, 1.0), (7, 0.25)])
def test_fixed_ratio_masks_round_r_n_clamped(n_present, ratio):
    present = torch.zeros(200, 7, dtype=torch.bool)
    present[:, :n_present] = True
    mask = random_organ_mask(present, (ratio, ratio), _gen())
    expected = min(round(ratio * n_present), n_present - 1)
    assert (mask.sum(1) == expected).all()


def _inclusion_without_replacement(p, m):
    """P(organ i among the m drawn) when organs are drawn one at a time, renormalising: by enumeration."""
    n = len(p)
    incl = [0.0] * n
    for order in itertools.permutations(range(n), m):
        prob, left = 1.0, 1.0
        for j in order:
            prob *= p[j] / left
            left -= p[j]
        for j in order:
            incl[j] += prob
    return torch.tensor(incl)


@pytest.mark.parametrize("m", [1, 2])
def test_draw_is_proportional_without_replacement(m):
    p = [0.55, 0.25, 0.15, 0.05]
    rows = 40000
    present = torch.ones(rows, 4, dtype=torch.bool)
    ratio = m / 4
    mask = sample_organ_mask(torch.tensor([p]).expand(rows, -1), present, (ratio, ratio), _gen(3))
    assert (mask.sum(1) == m).all()
    freq = mask.float().mean(0)
    assert torch.allclose(freq, _inclusion_without_replacement(p, m), atol=0.015)


def test_same_seed_same_mask():
    present = torch.rand(64, 7, generator=_gen(5)) < 0.7
    present[:, 0] = True
    a = random_organ_mask(present, (0.1, 0.5), _gen(9))
    b = random_organ_mask(present, (0.1, 0.5), _gen(9))
    c = random_organ_mask(present, (0.1, 0.5), _gen(10))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("mode, fraction, expected", [("sgm", 0.5, 1.0), ("random", 0.5, 0.25), ("mix", 0.5, 0.625)])
def test_organ_masking_modes(mode, fraction, expected):
    rows = 8000
    present = torch.ones(rows, 4, dtype=torch.bool)
    attention = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(rows, -1)  # the teacher looks at organ 0 only
    mask = organ_masking(mode, attention, present, fraction, floor=0.0, ratio_range=(0.25, 0.25), generator=_gen())
    assert (mask.sum(1) == 1).all()
    # SGM (floor 0) always hides organ 0; uniform hides it 1/4 of the time; mix is half and half
    assert mask[:, 0].float().mean().item() == pytest.approx(expected, abs=0.02)


def test_ill_arguments():
    present = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="mode"):
        organ_masking("attmask", None, present)
    with pytest.raises(ValueError, match="needs the teacher"):
        organ_masking("sgm", None, present)
    with pytest.raises(ValueError, match="floor"):
        sgm_probabilities(torch.rand(2, 3), present, 1.5)
    with pytest.raises(ValueError, match="ratio_range"):
        random_organ_mask(present, (0.6, 0.2))
    with pytest.raises(ValueError, match=r"batch index \[1\]"):
        random_organ_mask(torch.tensor([[1, 0], [0, 0]], dtype=torch.bool))
    with pytest.raises(ValueError, match="sgm_fraction"):
        organ_masking("mix", torch.rand(2, 3), present, sgm_fraction=2.0)
    with pytest.raises(ValueError, match="differ in shape"):
        sgm_probabilities(torch.rand(2, 4), present)


# ---------------------------------------------------------------- token-normalised organ attention (train.json grids)

# tokens per organ with train.json's grids and patch 16 (brain 6x7x6, heart 4x4x3, adipose 6x4x2, liver 5x5x3,
# kidney 4x4x3, spleen 4x3x3, pancreas 4x3x2): 531 in all
TRAIN_TOKENS = {"brain": 252, "heart": 48, "adipose": 48, "liver": 75, "kidney": 48, "spleen": 36, "pancreas": 24}


def _layout(present_row):
    """token_organ (1, L) of one subject packed in organ order, as PanFMEncoder packs it."""
    ids = [i for i, (o, n) in enumerate(TRAIN_TOKENS.items()) if present_row[i] for _ in range(n)]
    return torch.tensor([ids])


@pytest.mark.parametrize("missing", [None, 0, 6])
def test_uniform_attention_per_token_gives_uniform_probabilities(missing):
    present = torch.ones(1, 7, dtype=torch.bool)
    if missing is not None:
        present[0, missing] = False
    token_organ = _layout(present[0].tolist())
    attention = torch.full(token_organ.shape, 1.0 / (token_organ.shape[1] + 1))  # CLS takes one share too
    share = organ_attention_share(attention, token_organ, present)
    n = int(present.sum())
    expected = present.float() / n
    assert torch.allclose(share, expected, atol=1e-6)
    assert torch.allclose(sgm_probabilities(share, present, floor=0.2), expected, atol=1e-6)
    # a sum over each organ's tokens would have given the brain 252 / 531 and SGM probability 0.408
    if missing is None:
        assert float(share[0, 0]) == pytest.approx(1 / 7, abs=1e-6)


def test_small_organ_with_dominant_attention_per_token_gets_the_highest_probability():
    present = torch.ones(2, 7, dtype=torch.bool)
    token_organ = _layout([True] * 7).expand(2, -1)
    attention = torch.ones(token_organ.shape)
    attention[token_organ == 6] = 3.0  # pancreas (24 tokens): three times the attention of any other token
    attention[1, token_organ[1] == 0] = 0.5  # second subject: the brain's 252 tokens get half
    attention = attention / (attention.sum(1, keepdim=True) + 1.0)
    p = sgm_probabilities(organ_attention_share(attention, token_organ, present), present, floor=0.2)
    # independent: per-token means 1 (3 for the pancreas, 0.5 for the brain of subject 1), normalised
    for row, means in enumerate(([1.0] * 6 + [3.0], [0.5] + [1.0] * 5 + [3.0])):
        a = torch.tensor(means) / sum(means)
        assert torch.allclose(p[row], 0.8 * a + 0.2 / 7, atol=1e-6)
        assert int(p[row].argmax()) == 6
    assert float(p[0, 6]) == pytest.approx(0.8 * 3 / 9 + 0.2 / 7, abs=1e-6)


def test_encoder_attention_is_uniform_on_the_train_grid_when_attention_per_token_is():
    from medfm.data import ORGANS
    from medfm.networks.nets import PanFMEncoder

    shapes = {"brain": (96, 112, 96), "heart": (64, 64, 48), "adipose": (96, 64, 32), "liver": (80, 80, 48),
              "kidney": (64, 64, 48), "spleen": (64, 48, 48), "pancreas": (64, 48, 32)}  # train.json  # fmt: skip
    enc = PanFMEncoder(ORGANS, shapes, patch_size=16, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=8).eval()
    assert {o: enc.num_tokens[o] for o in ORGANS} == TRAIN_TOKENS
    with torch.no_grad():
        enc.blocks[0].attn.qkv.weight[:16].zero_()  # q = k = 0: every key gets the same attention
        enc.blocks[0].attn.qkv.bias[:16].zero_()
    images = {o: torch.randn(2, 1, *shapes[o]) for o in ORGANS}
    present = torch.tensor([[1] * 7, [0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    att = enc(images, present, return_attention=True).organ_attention
    assert torch.allclose(att, present.float() / present.sum(1, keepdim=True), atol=1e-5)
