import itertools

import pytest
import torch
from medfm.masking import organ_masking, random_organ_mask, sample_organ_mask, sgm_probabilities


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
