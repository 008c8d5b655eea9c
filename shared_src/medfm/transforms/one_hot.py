"""The post-processing MONAI's segmentation metrics read, as one named transform."""

from __future__ import annotations

from monai.transforms import Activationsd, AsDiscreted, Compose

__all__ = ["SegmentationOneHotd"]


class SegmentationOneHotd(Compose):
    """Prediction and label as one-hot class maps for ``MeanDice`` and the lesion metrics: ``Activationsd``
    (softmax over the ``pred`` logits) then ``AsDiscreted`` (``pred`` arg-max, both keys one-hot with
    ``num_classes`` channels), as the model zoo's segmentation bundles write them.

    Input per case: ``pred`` (C, *spatial) logits, ``label`` (1, *spatial) class indices; output: both (C, *spatial).

    Args:
        num_classes: classes C (background included).
        pred_key: key of the logits.
        label_key: key of the class map.
    """

    def __init__(self, num_classes: int, pred_key: str = "pred", label_key: str = "label") -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
        super().__init__(
            [
                Activationsd(keys=pred_key, softmax=True),
                AsDiscreted(keys=[pred_key, label_key], argmax=[True, False], to_onehot=[num_classes, num_classes]),
            ]
        )
