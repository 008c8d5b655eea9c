"""Case-level classification metrics: per-class recall, macro sensitivity and accuracy.

References:
    - FratMAE (arXiv:2503.02824) evaluates Ann Arbor staging (early vs advanced) with macro sensitivity, the
      unweighted mean of the per-class recalls (a.k.a. balanced accuracy), and accuracy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["accuracy", "confusion_matrix", "macro_sensitivity", "per_class_recall", "recall_from_confusion"]


def _labels(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x).ravel()
    if a.size and not np.all(np.equal(np.mod(a, 1), 0)):
        raise ValueError(f"{name} must hold integer class indices, got {a.tolist()}.")
    return a.astype(np.int64)


def _pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.size} and {p.size}.")
    if t.size == 0:
        raise ValueError("y_true and y_pred are empty; need at least one case.")
    return t, p


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Counts ``[true class][predicted class]``, shape ``(num_classes, num_classes)``, int64.

    Raises:
        ValueError: lengths differ, empty input, ``num_classes < 1`` or a class index outside ``[0, num_classes)``.
    """
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    t, p = _pair(y_true, y_pred)
    for name, a in (("y_true", t), ("y_pred", p)):
        bad = a[(a < 0) | (a >= num_classes)]
        if bad.size:
            raise ValueError(f"{name} has class indices {sorted(set(bad.tolist()))} outside [0, {num_classes}).")
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (t, p), 1)
    return confusion


def recall_from_confusion(confusion: Any) -> np.ndarray:
    """Per-class recall from a ``[true][pred]`` confusion matrix: diagonal / row sum; NaN for an empty row.

    The one computation behind :func:`per_class_recall`, :func:`macro_sensitivity`, the test-time
    :class:`~medfm.metrics.ClassificationReport` and the validation metric :class:`~medfm.metrics.MacroSensitivity`.
    """
    c = np.asarray(confusion.detach().cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"confusion must be a square (K, K) matrix, got shape {c.shape}.")
    support = c.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(c) / np.maximum(support, 1), np.nan)


def per_class_recall(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Recall (sensitivity) of each class: ``TP_c / (number of cases with y_true == c)``.

    Args:
        y_true: (n,) true class indices in ``[0, num_classes)``.
        y_pred: (n,) predicted class indices in ``[0, num_classes)``.
        num_classes: number of classes.

    Returns:
        (num_classes,) float array; NaN for a class absent from ``y_true`` (its recall is undefined).

    Raises:
        ValueError: lengths differ, empty input, or a class index outside ``[0, num_classes)``.
    """
    return recall_from_confusion(confusion_matrix(y_true, y_pred, num_classes))


def macro_sensitivity(y_true: Any, y_pred: Any, num_classes: int) -> float:
    """Macro sensitivity: unweighted mean of the per-class recalls over the classes PRESENT in ``y_true``.

    Classes with no true case are skipped (their recall is undefined) rather than counted as 0 or 1; a
    prediction of an absent class still lowers the recall of the true class of that case. This is not
    accuracy: 8 class-0 and 2 class-1 cases all predicted 0 give 0.5 (accuracy 0.8).

    Args:
        y_true: (n,) true class indices.
        y_pred: (n,) predicted class indices.
        num_classes: number of classes.

    Returns:
        Macro sensitivity in [0, 1].

    Raises:
        ValueError: see :func:`per_class_recall`.
    """
    return float(np.nanmean(per_class_recall(y_true, y_pred, num_classes)))


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of cases with ``y_pred == y_true``.

    Args:
        y_true: (n,) true class indices.
        y_pred: (n,) predicted class indices.

    Raises:
        ValueError: lengths differ or empty input.
    """
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p))
