"""Ignite metrics for validation during fine-tuning, computed exactly as the test-time reports compute them.

MONAI's ``ConfusionMatrix(metric_name="sensitivity", reduction="mean")`` pools the counts of all classes before
dividing, which is accuracy for a single-label task (8 class-0 and 2 class-1 cases, all predicted 0, give 0.8),
and ``MeanDice`` drops empty-label cases on its own terms; a best-model saver keyed on either picks checkpoints by
another number than the one the evaluation reports. These metrics call the report's functions
(:func:`medfm.metrics.recall_from_confusion`, :func:`medfm.metrics.lesion_dice_iou`), so model selection and
the final report agree. Both accumulate small tensors that ignite all-reduces across ranks (multi-GPU validation
gives the metric of the whole validation set on every rank).

Inputs (``output_transform`` such as ``monai.handlers.from_engine(["pred", "label"])`` after MONAI's decollating
evaluator): ``(y_pred, y)``, each a list of per-sample tensors or one batched tensor.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from .classification import recall_from_confusion
from .segmentation import lesion_dice_iou

__all__ = ["LesionDice", "MacroSensitivity"]


def _samples(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return list(x)
    if isinstance(x, Sequence):
        return [torch.as_tensor(v) for v in x]
    raise ValueError(f"expected a batch tensor or a list of per-sample tensors, got {type(x).__name__}.")


def _sample_pairs(output: tuple[Any, Any]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(y_pred, y)`` as a list of per-sample ``(prediction, label)`` pairs."""
    y_pred, y = output
    preds, labels = _samples(y_pred), _samples(y)
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions but {len(labels)} labels.")
    return list(zip(preds, labels))


def _class_index(x: torch.Tensor, num_classes: int) -> int:
    """One sample's class: argmax of ``num_classes`` scores / a one-hot vector, or an integer label."""
    v = x.detach().reshape(-1)
    if v.numel() == num_classes and num_classes > 1:
        return int(v.argmax())
    if v.numel() == 1 and float(v) == int(v) and 0 <= int(v) < num_classes:
        return int(v)
    raise ValueError(f"expected {num_classes} class scores or a class index in [0, {num_classes}), got {v.tolist()}.")


class MacroSensitivity(Metric):
    """Macro sensitivity (mean per-class recall over the classes present) over the whole validation set.

    Accumulates a ``[true][pred]`` confusion matrix (all-reduced across ranks) and computes
    :func:`medfm.metrics.recall_from_confusion`, the function behind the test-time ``ClassificationReport``.

    Args:
        num_classes: number of classes (>= 2).
        output_transform: maps the engine output to ``(y_pred, y)``.
        device: where the confusion matrix is kept.
    """

    def __init__(self, num_classes: int, output_transform: Callable = lambda x: x, device: str | torch.device = "cpu"):
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        self.num_classes = int(num_classes)
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=self._device)

    @reinit__is_reduced
    def update(self, output: tuple[Any, Any]) -> None:
        for p, t in _sample_pairs(output):
            self._confusion[_class_index(t, self.num_classes), _class_index(p, self.num_classes)] += 1

    @sync_all_reduce("_confusion")
    def compute(self) -> float:
        if int(self._confusion.sum()) == 0:
            raise RuntimeError("MacroSensitivity needs at least one sample before it can be computed.")
        return float(np.nanmean(recall_from_confusion(self._confusion)))


class LesionDice(Metric):
    """Mean Dice over the validation cases WITH a lesion (:func:`medfm.metrics.lesion_dice_iou`).

    Negative cases (no lesion voxel in the label) have no Dice under the collection's policy (AutoPET's); they
    are counted in ``num_negative`` and scored by the test-time report's false-positive volume. With no
    positive case in the set the metric is NaN, with a warning.

    Per sample, ``y_pred`` and ``y`` are (C, X, Y, Z) one-hot / scores (argmax over C when C > 1) or (1, X, Y, Z)
    label maps; the lesion mask is ``== lesion_label``.

    Args:
        lesion_label: label value of the lesion class.
        output_transform: maps the engine output to ``(y_pred, y)``.
        device: where the running sums are kept.
    """

    def __init__(self, lesion_label: int = 1, output_transform: Callable = lambda x: x,
                 device: str | torch.device = "cpu"):  # fmt: skip
        self.lesion_label = int(lesion_label)
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        # [sum of Dice over positive cases, number of positive cases, number of negative cases]
        self._sums = torch.zeros(3, dtype=torch.float64, device=self._device)

    def _mask(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if x.ndim < 2:
            raise ValueError(f"expected a (C, *spatial) sample, got shape {tuple(x.shape)}.")
        return (x.argmax(0) if x.shape[0] > 1 else x[0]) == self.lesion_label

    @reinit__is_reduced
    def update(self, output: tuple[Any, Any]) -> None:
        for p, t in _sample_pairs(output):
            positive, dice, _ = lesion_dice_iou(self._mask(p).cpu().numpy(), self._mask(t).cpu().numpy())
            if positive:
                self._sums += torch.tensor([dice, 1.0, 0.0], dtype=torch.float64, device=self._device)
            else:
                self._sums += torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=self._device)

    @sync_all_reduce("_sums")
    def compute(self) -> float:
        total, positive, negative = (float(v) for v in self._sums)
        if positive + negative == 0:
            raise RuntimeError("LesionDice needs at least one sample before it can be computed.")
        if positive == 0:
            warnings.warn(f"LesionDice: none of the {int(negative)} validation cases has a lesion; Dice is "
                          "undefined (NaN).", stacklevel=2)  # fmt: skip
            return float("nan")
        return total / positive
