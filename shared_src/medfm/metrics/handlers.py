"""Ignite handlers writing per-case evaluation reports (CSV + JSON) for MONAI bundle evaluators.

Both go in a bundle evaluator's ``val_handlers`` and read ``engine.state.output`` after every iteration: with MONAI's
``SupervisedEvaluator`` (decollate on) a LIST of per-sample dicts of ``pred`` / ``label`` MetaTensors after
postprocessing, the other batch keys (e.g. the string ``case``) staying in the decollated ``engine.state.batch``; a
dict output is decollated here. Case id: output sample dict first, then the batch, else ``case_<k>`` (running index).
Runs reset at STARTED. Distributed runs: each rank reports on its own cases (no gathering); with more than one
process the files get a ``_rank<r>`` suffix.

References:
    - FratMAE (arXiv:2503.02824): Dice / IoU with 1,000-sample bootstrap 95% CIs and AutoPET FP / FN volumes for
      lesion segmentation; macro sensitivity and accuracy for Ann Arbor staging.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch

from .bootstrap import bootstrap_ci
from .classification import accuracy, confusion_matrix, recall_from_confusion
from .segmentation import lesion_case_metrics, voxel_volume_from_affine

__all__ = ["ClassificationReport", "SegmentationReport"]


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.as_tensor() if isinstance(x, MetaTensor) else x
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return None if _is_nan(obj) else obj


def _case_str(value: Any) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, (torch.Tensor, np.ndarray)) and np.size(value) == 1:
        value = _numpy(value).reshape(()).item()
    return str(value)


class _CaseReport:
    """Shared plumbing: reset at STARTED, collect rows per sample at ITERATION_COMPLETED, write at COMPLETED."""

    columns: tuple[str, ...] = ("case",)

    def __init__(self, output_dir: str, pred_key: str, label_key: str, case_key: str, filename: str) -> None:
        if not filename:
            raise ValueError(f"filename must be a non-empty file stem, got {filename!r}.")
        self.output_dir = output_dir
        self.pred_key, self.label_key, self.case_key = pred_key, label_key, case_key
        self.filename = filename
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        """Register on ``engine`` (STARTED: reset, ITERATION_COMPLETED: collect, COMPLETED: write)."""
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def reset(self, engine: Engine | None = None) -> None:
        self.rows = []

    def _case_id(self, sample: dict, batch: Any, i: int) -> str:
        if isinstance(sample, dict) and sample.get(self.case_key) is not None:
            return _case_str(sample[self.case_key])
        if isinstance(batch, (list, tuple)) and i < len(batch) and isinstance(batch[i], dict):
            if batch[i].get(self.case_key) is not None:
                return _case_str(batch[i][self.case_key])
        elif isinstance(batch, dict) and batch.get(self.case_key) is not None:
            value = batch[self.case_key]
            return _case_str(value[i] if isinstance(value, (list, tuple, torch.Tensor, np.ndarray)) else value)
        return f"case_{len(self.rows)}"

    def iteration_completed(self, engine: Engine) -> None:
        output = engine.state.output
        samples = decollate_batch(output, detach=True) if isinstance(output, dict) else list(output)
        for i, sample in enumerate(samples):
            for key in (self.pred_key, self.label_key):
                if not isinstance(sample, dict) or key not in sample:
                    raise ValueError(f"{type(self).__name__}: no key '{key}' in output sample {type(sample).__name__} "
                                     f"(keys: {list(sample) if isinstance(sample, dict) else None}).")
            row = {"case": self._case_id(sample, engine.state.batch, i)}
            row.update(self._case_metrics(sample[self.pred_key], sample[self.label_key]))
            self.rows.append(row)

    def _case_metrics(self, pred: Any, label: Any) -> dict[str, Any]:  # one CSV row, less the case id
        raise NotImplementedError

    def _summary(self) -> tuple[dict[str, Any], dict[str, float]]:  # (JSON summary, state.metrics), rows non-empty
        raise NotImplementedError

    def _path(self, ext: str) -> str:
        suffix = f"_rank{idist.get_rank()}" if idist.get_world_size() > 1 else ""
        return os.path.join(self.output_dir, f"{self.filename}{suffix}.{ext}")

    def completed(self, engine: Engine) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        with open(self._path("csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.columns))
            writer.writeheader()
            writer.writerows([{k: "" if _is_nan(v) else v for k, v in r.items()} for r in self.rows])
        summary: dict[str, Any] = {"num_cases": len(self.rows)}
        if self.rows:
            extra, metrics = self._summary()
            summary.update(extra)
            engine.state.metrics.update(metrics)
        else:
            warnings.warn(f"{type(self).__name__}: no case was evaluated; writing empty reports.", stacklevel=2)
        summary["cases"] = self.rows
        with open(self._path("json"), "w") as f:  # undefined values (NaN) as null: strict JSON
            json.dump(_nan_to_none(summary), f, indent=2)


class SegmentationReport(_CaseReport):
    """Per-case Dice, IoU, FP and FN lesion volumes (ml), with bootstrap CIs of mean Dice / IoU.

    Per sample, ``pred`` and ``label`` are (1, X, Y, Z) label maps or (C, X, Y, Z) one-hot / probabilities
    (argmax over C when C > 1); the lesion mask is ``== lesion_label``. The voxel volume is ``|det|`` of the 3x3
    spatial part of the label's MetaTensor ``affine`` (else the prediction's; 1 mm³ with a warning if neither has
    one). Scoring policy (:func:`medfm.metrics.lesion_case_metrics`, the same as validation's
    :class:`medfm.metrics.LesionDice`, following the AutoPET challenge): Dice and IoU are means over the cases
    WITH a lesion (a negative case's Dice is undefined: empty in the CSV, left out of the mean and its CI); the
    false-positive volume is reported over the negative cases (``fp_ml_negative``) and over all cases; the
    false-negative volume over the positive cases. FP / FN volumes use 26-connectivity.

    Writes ``<output_dir>/<filename>.csv`` (case, positive, dice, iou, fp_ml, fn_ml; one row per case) and ``.json``
    (``num_cases``, ``num_positive``, ``num_negative``, ``num_bootstrap``, ``confidence``, ``seed``, ``summary``:
    dice / iou -> {mean, ci_low, ci_high} over positive cases, fp_ml -> {mean} over all cases, fp_ml_negative ->
    {mean} over negative cases, fn_ml -> {mean} over positive cases, ``cases``); sets ``engine.state.metrics``
    ``mean_dice``, ``dice_ci_low``, ``dice_ci_high``, the same for iou, ``mean_fp_ml``, ``mean_fp_ml_negative``
    and ``mean_fn_ml`` (NaN where no case of the kind was evaluated).

    Args:
        output_dir: folder of the reports (created); ``filename``: their file stem.
        pred_key, label_key, case_key: keys of prediction, ground truth, case id (output sample dict, then batch).
        lesion_label: label value of the lesion class.
        num_bootstrap, seed, confidence: bootstrap resamples, seed and CI coverage (:func:`medfm.metrics.bootstrap_ci`).
    """

    columns = ("case", "positive", "dice", "iou", "fp_ml", "fn_ml")

    def __init__(
        self,
        output_dir: str,
        pred_key: str = "pred",
        label_key: str = "label",
        case_key: str = "case",
        lesion_label: int = 1,
        num_bootstrap: int = 1000,
        seed: int = 0,
        filename: str = "metrics",
        confidence: float = 0.95,
    ) -> None:
        super().__init__(output_dir, pred_key, label_key, case_key, filename)
        if int(num_bootstrap) < 1:
            raise ValueError(f"num_bootstrap must be >= 1, got {num_bootstrap}.")
        self.lesion_label, self.num_bootstrap = lesion_label, int(num_bootstrap)
        self.seed, self.confidence = seed, confidence

    def _mask(self, x: Any, name: str) -> np.ndarray:
        a = _numpy(x)
        if a.ndim != 4:
            raise ValueError(f"{name} must be (C, X, Y, Z) per sample, got shape {a.shape}.")
        a = a.argmax(axis=0) if a.shape[0] > 1 else a[0]
        return a == self.lesion_label

    @staticmethod
    def _voxel_ml(pred: Any, label: Any) -> float:
        for x in (label, pred):
            if isinstance(x, MetaTensor):
                affine = _numpy(x.affine)
                while affine.ndim > 2:
                    affine = affine[0]
                return voxel_volume_from_affine(affine, spatial_dims=3)
        warnings.warn("SegmentationReport: no MetaTensor affine found; assuming 1 mm³ voxels.", stacklevel=2)
        return 1e-3

    def _case_metrics(self, pred: Any, label: Any) -> dict[str, Any]:
        row = lesion_case_metrics(self._mask(pred, "pred"), self._mask(label, "label"), self._voxel_ml(pred, label))
        row["positive"] = int(row["positive"])
        return row

    def _summary(self) -> tuple[dict[str, Any], dict[str, float]]:
        positive = [r for r in self.rows if r["positive"]]
        negative = [r for r in self.rows if not r["positive"]]
        summary: dict[str, Any] = {}
        metrics: dict[str, float] = {}
        nan = float("nan")
        for name in ("dice", "iou"):
            if positive:
                values = [r[name] for r in positive]
                mean, low, high = bootstrap_ci(values, self.num_bootstrap, self.confidence, self.seed)
            else:
                warnings.warn("SegmentationReport: no case with a lesion; Dice and IoU are undefined.", stacklevel=2)
                mean = low = high = nan
            summary[name] = {"mean": mean, "ci_low": low, "ci_high": high}
            metrics.update({f"mean_{name}": mean, f"{name}_ci_low": low, f"{name}_ci_high": high})
        for name, rows in (("fp_ml", self.rows), ("fp_ml_negative", negative), ("fn_ml", positive)):
            mean = float(np.mean([r[name.removesuffix("_negative")] for r in rows])) if rows else nan
            summary[name] = {"mean": mean}
            metrics[f"mean_{name}"] = mean
        extra = {"num_positive": len(positive), "num_negative": len(negative), "num_bootstrap": self.num_bootstrap,
                 "confidence": self.confidence, "seed": self.seed}  # fmt: skip
        return {**extra, "summary": summary}, metrics


class ClassificationReport(_CaseReport):
    """Per-case class predictions and probabilities, macro sensitivity and accuracy.

    Per sample, ``pred`` is (num_classes,) logits or probabilities: used as probabilities when all lie in [0, 1] and
    sum to 1, else softmax is applied; the predicted class is the argmax. ``label`` is an int class (int, 0-d or
    1-element tensor) or a (num_classes,) one-hot vector. Macro sensitivity averages recall over the classes present
    among the evaluated cases (:func:`medfm.metrics.macro_sensitivity`).

    Writes ``<output_dir>/<filename>.csv`` (columns case, label, pred, prob_0 ... prob_{K-1}) and ``.json``
    (``num_cases``, ``num_classes``, ``macro_sensitivity``, ``accuracy``, ``per_class_recall`` with null for absent
    classes, ``confusion_matrix`` [true][pred], ``cases``); sets ``engine.state.metrics`` keys
    ``macro_sensitivity`` and ``accuracy``.

    Args:
        output_dir: folder of the reports (created); ``filename``: their file stem.
        pred_key, label_key, case_key: keys of scores, true class, case id (output sample dict, then batch).
        num_classes: number of classes (>= 2).
    """

    def __init__(
        self,
        output_dir: str,
        pred_key: str = "pred",
        label_key: str = "label",
        case_key: str = "case",
        num_classes: int = 2,
        filename: str = "metrics",
    ) -> None:
        super().__init__(output_dir, pred_key, label_key, case_key, filename)
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        self.num_classes = int(num_classes)
        self.columns = ("case", "label", "pred", *(f"prob_{c}" for c in range(self.num_classes)))

    def _case_metrics(self, pred: Any, label: Any) -> dict[str, Any]:
        k = self.num_classes
        scores = _numpy(pred).astype(np.float64).ravel()
        if scores.size != k:
            raise ValueError(f"pred must hold num_classes={k} scores per sample, got shape {np.shape(_numpy(pred))}.")
        if not (np.all((scores >= 0) & (scores <= 1)) and math.isclose(scores.sum(), 1.0, abs_tol=1e-4)):
            scores = np.exp(scores - scores.max())
            scores = scores / scores.sum()
        y = _numpy(label).ravel()
        if y.size == k and set(np.unique(y).tolist()) <= {0, 1} and y.sum() == 1:
            y_int = int(y.argmax())
        elif y.size == 1 and float(y.item()).is_integer() and 0 <= y.item() < k:
            y_int = int(y.item())
        else:
            raise ValueError(f"label must be a class in [0, {k}) or a one-hot ({k},) vector, got {y.tolist()}.")
        row: dict[str, Any] = {"label": y_int, "pred": int(scores.argmax())}
        row.update({f"prob_{c}": float(scores[c]) for c in range(k)})
        return row

    def _summary(self) -> tuple[dict[str, Any], dict[str, float]]:
        y_true = np.array([r["label"] for r in self.rows])
        y_pred = np.array([r["pred"] for r in self.rows])
        confusion = confusion_matrix(y_true, y_pred, self.num_classes)
        recall = recall_from_confusion(confusion)
        sens = float(np.nanmean(recall))  # = macro_sensitivity(y_true, y_pred, num_classes)
        acc = accuracy(y_true, y_pred)
        summary = {"num_classes": self.num_classes, "macro_sensitivity": sens, "accuracy": acc}
        summary["per_class_recall"] = [None if np.isnan(r) else float(r) for r in recall]
        summary["confusion_matrix"] = confusion.tolist()
        return summary, {"macro_sensitivity": sens, "accuracy": acc}
