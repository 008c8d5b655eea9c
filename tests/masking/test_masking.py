import pytest
import torch

from medfm.masking import asymmetric_cross_modal_masking, independent_masking, num_visible, random_masking


@pytest.mark.parametrize("n,ratio", [(240, 0.5), (7, 0.5), (100, 0.75), (10, 0.0)])
def test_random_masking_counts_and_inverse(n, ratio):
    g = torch.Generator().manual_seed(1)
    mk = random_masking(3, n, ratio, g)
    keep = num_visible(n, ratio)
    assert mk.ids_keep.shape == (3, keep)
    assert (mk.mask.sum(1) == n - keep).all()
    # ids_restore inverts the shuffle: visible tokens sit at positions < keep
    for b in range(3):
        assert set(mk.ids_keep[b].tolist()) == set(torch.nonzero(~mk.mask[b]).flatten().tolist())
        shuffled = torch.cat([mk.ids_keep[b], torch.nonzero(mk.mask[b]).flatten()])
        # gather(shuffle-ordered ids, ids_restore) gives back 0..n-1 when shuffle order is the restore inverse
        order = torch.argsort(mk.ids_restore[b])
        assert torch.equal(order[:keep], mk.ids_keep[b])
        assert sorted(shuffled.tolist()) == list(range(n))


def test_exactly_half_of_one_modality_masked_other_untouched():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        masks = asymmetric_cross_modal_masking(4, 240, 0.5, ("pet", "ct"), g)
        masked = [m for m, v in masks.items() if v is not None]
        assert len(masked) == 1
        seen.add(masked[0])
        mk = masks[masked[0]]
        assert (mk.mask.sum(1) == 120).all()
    assert seen == {"pet", "ct"}  # both modalities get picked


def test_same_seed_same_mask_and_forced_modality():
    a = asymmetric_cross_modal_masking(2, 50, 0.5, generator=torch.Generator().manual_seed(5))
    b = asymmetric_cross_modal_masking(2, 50, 0.5, generator=torch.Generator().manual_seed(5))
    ma = next(v for v in a.values() if v is not None)
    mb = next(v for v in b.values() if v is not None)
    assert torch.equal(ma.mask, mb.mask)
    forced = asymmetric_cross_modal_masking(2, 50, 0.5, masked_modality="ct")
    assert forced["pet"] is None and forced["ct"] is not None


def test_independent_masking_masks_both():
    masks = independent_masking(2, 40, 0.5, generator=torch.Generator().manual_seed(0))
    assert all(v is not None for v in masks.values())
    assert not torch.equal(masks["pet"].mask, masks["ct"].mask)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ill_arg(ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(1, 10, ratio)
    with pytest.raises(ValueError, match="masked_modality"):
        asymmetric_cross_modal_masking(1, 10, 0.5, masked_modality="mri")
