"""Lesion segmentation metrics: Dice / IoU and the AutoPET false-positive / false-negative lesion volumes.

References:
    - FratMAE (arXiv:2503.02824) reports Dice and IoU for PET/CT lesion segmentation, plus the AutoPET
      false-positive and false-negative volumes.
    - AutoPET challenge evaluation (Gatidis et al., https://autopet.grand-challenge.org/Evaluation/ and
      https://github.com/lab-midas/autoPET ``val_script.py``): FP volume is the volume of predicted connected
      components that do not overlap the ground truth, FN volume the volume of ground-truth connected
      components that no predicted voxel overlaps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "as_binary_mask",
    "dice_iou",
    "lesion_case_metrics",
    "lesion_dice_iou",
    "lesion_fp_fn_volumes",
    "voxel_volume_from_affine",
]

# neighbourhood size -> rank of `scipy.ndimage.generate_binary_structure` for 3D arrays
_CONNECTIVITY_3D = {6: 1, 18: 2, 26: 3}


def as_binary_mask(x: Any) -> np.ndarray:
    """Any array-like (numpy, torch, MetaTensor, nested list) -> numpy bool array, foreground = non-zero."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        x = x.numpy()
    return np.asarray(x) != 0


def _pair(pred: Any, label: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = as_binary_mask(pred), as_binary_mask(label)
    if p.shape != g.shape:
        raise ValueError(f"pred and label must have the same shape, got pred {p.shape} and label {g.shape}.")
    return p, g


def dice_iou(pred: Any, label: Any) -> tuple[float, float]:
    """Dice and IoU (Jaccard) of two binary masks.

    ``dice = 2 |P ∩ G| / (|P| + |G|)`` and ``iou = |P ∩ G| / |P ∪ G|`` over all voxels.

    Args:
        pred: predicted mask, numpy or torch, any shape; non-zero = foreground.
        label: ground-truth mask, same shape as ``pred``.

    Returns:
        ``(dice, iou)`` as floats in [0, 1]. When both masks are empty (no lesion predicted and none present,
        e.g. AutoPET's negative control cases) both are defined as 1.0: the prediction is perfect.

    Raises:
        ValueError: ``pred`` and ``label`` shapes differ.
    """
    p, g = _pair(pred, label)
    inter = int(np.count_nonzero(p & g))
    n_p, n_g = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    union = n_p + n_g - inter
    if union == 0:
        return 1.0, 1.0
    return 2.0 * inter / (n_p + n_g), inter / union


def voxel_volume_from_affine(affine: Any, spatial_dims: int = 3) -> float:
    """Voxel volume in ml from an affine: ``|det(affine[:d, :d])|`` mm³ / 1000.

    Args:
        affine: (d + 1, d + 1) voxel-to-world matrix in mm (numpy or torch), e.g. a MetaTensor's ``affine``.
        spatial_dims: ``d``, number of spatial dimensions.

    Raises:
        ValueError: the affine is smaller than (d, d) or has a zero spatial determinant.
    """
    if isinstance(affine, torch.Tensor):
        affine = affine.detach().cpu().double().numpy()
    a = np.asarray(affine, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] < spatial_dims or a.shape[1] < spatial_dims:
        raise ValueError(f"affine must be a ({spatial_dims + 1}, {spatial_dims + 1}) matrix, got shape {a.shape}.")
    vol = abs(float(np.linalg.det(a[:spatial_dims, :spatial_dims])))
    if vol == 0.0:
        raise ValueError(f"affine has a singular spatial part (voxel volume 0): {a.tolist()}.")
    return vol / 1000.0


def _squeeze_3d(mask: np.ndarray) -> np.ndarray:
    while mask.ndim > 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 3:
        raise ValueError(f"lesion volumes need a 3D mask (X, Y, Z) or (1, X, Y, Z), got shape {mask.shape}.")
    return mask


def _unmatched_component_voxels(mask: np.ndarray, other: np.ndarray, structure: np.ndarray) -> int:
    """Voxels of ``mask``'s connected components that share no voxel with ``other``."""
    comps, n = ndimage.label(mask, structure=structure)
    if n == 0:
        return 0
    matched = np.unique(comps[other & mask])
    unmatched = mask & ~np.isin(comps, matched)
    return int(np.count_nonzero(unmatched))


def lesion_fp_fn_volumes(
    pred: Any, label: Any, voxel_volume_ml: float, connectivity: int = 26
) -> tuple[float, float]:
    """AutoPET false-positive and false-negative lesion volumes in ml.

    - FP volume: total volume of connected components of ``pred`` that do not overlap any ground-truth voxel.
    - FN volume: total volume of connected components of ``label`` that no predicted voxel overlaps.

    A partially detected lesion therefore adds nothing to either volume, however poor its Dice.

    Args:
        pred: predicted binary mask, (X, Y, Z) or (1, X, Y, Z), numpy or torch; non-zero = lesion.
        label: ground-truth binary mask, same shape.
        voxel_volume_ml: volume of one voxel in ml (mm³ / 1000; see :func:`voxel_volume_from_affine`).
        connectivity: 6, 18 or 26 neighbourhood of the connected components. 26 (face, edge and corner
            neighbours) is the default here; note the reference ``val_script.py`` of lab-midas/autoPET uses
            ``cc3d`` with 18.

    Returns:
        ``(fp_ml, fn_ml)``.

    Raises:
        ValueError: shapes differ or are not 3D, unknown ``connectivity``, non-positive voxel volume.
    """
    if connectivity not in _CONNECTIVITY_3D:
        raise ValueError(f"connectivity must be one of {sorted(_CONNECTIVITY_3D)}, got {connectivity}.")
    vox = float(voxel_volume_ml)
    if not np.isfinite(vox) or vox <= 0:
        raise ValueError(f"voxel volume must be a positive finite number of ml, got {voxel_volume_ml}.")
    p, g = _pair(pred, label)
    p, g = _squeeze_3d(p), _squeeze_3d(g)
    structure = ndimage.generate_binary_structure(3, _CONNECTIVITY_3D[connectivity])
    fp = _unmatched_component_voxels(p, g, structure)
    fn = _unmatched_component_voxels(g, p, structure)
    return fp * vox, fn * vox


def lesion_dice_iou(pred: Any, label: Any) -> tuple[bool, float, float]:
    """Dice and IoU under the collection's single scoring policy (the AutoPET challenge's).

    About half of AutoPET's FDG studies are negative controls. Dice and IoU are defined on cases WITH a lesion
    only: a negative case gives ``NaN`` (left out of every mean) and is scored by its false-positive volume
    instead (:func:`lesion_case_metrics`). Validation (:class:`medfm.metrics.LesionDice`) and the test-time
    :class:`medfm.metrics.SegmentationReport` both use this function, so model selection and the reported
    numbers follow one definition.

    Args:
        pred: predicted binary mask, any shape; non-zero = lesion.
        label: ground-truth binary mask, same shape.

    Returns:
        ``(positive, dice, iou)``: whether the label has a lesion voxel, and Dice / IoU (NaN when not positive).
    """
    p, g = _pair(pred, label)
    if not g.any():
        return False, float("nan"), float("nan")
    dice, iou = dice_iou(p, g)
    return True, dice, iou


def lesion_case_metrics(pred: Any, label: Any, voxel_volume_ml: float, connectivity: int = 26) -> dict[str, Any]:
    """One case's lesion-segmentation metrics: :func:`lesion_dice_iou` plus the FP / FN lesion volumes.

    Args:
        pred: predicted binary mask, (X, Y, Z) or (1, X, Y, Z); non-zero = lesion.
        label: ground-truth binary mask, same shape.
        voxel_volume_ml: volume of one voxel in ml.
        connectivity: neighbourhood of the connected components of the FP / FN volumes.

    Returns:
        ``{"positive": bool, "dice", "iou": float (NaN when not positive), "fp_ml", "fn_ml": float}``.
    """
    positive, dice, iou = lesion_dice_iou(pred, label)
    fp_ml, fn_ml = lesion_fp_fn_volumes(pred, label, voxel_volume_ml, connectivity)
    return {"positive": positive, "dice": dice, "iou": iou, "fp_ml": fp_ml, "fn_ml": fn_ml}
