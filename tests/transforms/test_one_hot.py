"""``SegmentationOneHotd`` against the two MONAI transforms it names applied by hand, and a one-hot by index."""

from __future__ import annotations

import pytest
import torch
from monai.transforms import Activationsd, AsDiscreted

from medfm.transforms import SegmentationOneHotd


def test_segmentation_one_hot_equals_activations_then_as_discrete():
    torch.manual_seed(0)
    case = {"pred": torch.randn(3, 4, 5, 6), "label": torch.randint(0, 3, (1, 4, 5, 6)).float()}
    out = SegmentationOneHotd(3)(dict(case))
    hand = Activationsd(keys="pred", softmax=True)(dict(case))
    hand = AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=[3, 3])(hand)
    for k in ("pred", "label"):
        torch.testing.assert_close(torch.as_tensor(out[k]), torch.as_tensor(hand[k]))
    # and by index: channel c of the one-hot is (class map == c)
    expected = torch.stack([(case["pred"].argmax(0) == c).float() for c in range(3)])
    torch.testing.assert_close(torch.as_tensor(out["pred"]), expected)
    torch.testing.assert_close(torch.as_tensor(out["label"]), torch.cat([case["label"] == c for c in range(3)]).float())


@pytest.mark.parametrize("num_classes", [1, 2.0, True])
def test_segmentation_one_hot_names_a_bad_class_count(num_classes):
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        SegmentationOneHotd(num_classes)
