"""Evaluation metrics and report handlers (FratMAE, arXiv:2503.02824; AutoPET challenge definitions)."""

from .bootstrap import bootstrap_ci
from .classification import accuracy, confusion_matrix, macro_sensitivity, per_class_recall, recall_from_confusion
from .handlers import ClassificationReport, SegmentationReport
from .multilabel import SubjectProbabilityWriter, auroc, multilabel_auroc, write_auroc_table
from .robustness import missing_organ_conditions, missing_organ_robustness
from .segmentation import (
    as_binary_mask,
    dice_iou,
    lesion_case_metrics,
    lesion_dice_iou,
    lesion_fp_fn_volumes,
    voxel_volume_from_affine,
)
from .validation import LesionDice, MacroSensitivity

__all__ = [
    "ClassificationReport",
    "LesionDice",
    "MacroSensitivity",
    "SegmentationReport",
    "SubjectProbabilityWriter",
    "accuracy",
    "as_binary_mask",
    "auroc",
    "bootstrap_ci",
    "confusion_matrix",
    "dice_iou",
    "lesion_case_metrics",
    "lesion_dice_iou",
    "lesion_fp_fn_volumes",
    "macro_sensitivity",
    "missing_organ_conditions",
    "missing_organ_robustness",
    "multilabel_auroc",
    "per_class_recall",
    "recall_from_confusion",
    "voxel_volume_from_affine",
    "write_auroc_table",
]
