"""Dice / IoU and AutoPET FP / FN lesion volumes on hand-made masks with counts worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medfm.metrics import dice_iou, lesion_fp_fn_volumes, voxel_volume_from_affine


def test_dice_iou_hand_counts_numpy_and_torch():
    pred = np.zeros((2, 3, 4), dtype=np.uint8)
    label = np.zeros((2, 3, 4), dtype=np.uint8)
    pred[0, :, :2] = 1  # |P| = 3 * 2 = 6
    label[0, :2, :] = 1  # |G| = 2 * 4 = 8
    # P ∩ G = [0, 0:2, 0:2] -> 4 voxels; union = 6 + 8 - 4 = 10
    dice, iou = dice_iou(pred, label)
    assert dice == pytest.approx(2 * 4 / (6 + 8))
    assert iou == pytest.approx(4 / 10)
    # torch (float, non-binary non-zero values) gives the same
    assert dice_iou(torch.from_numpy(pred).float() * 3, torch.from_numpy(label).bool()) == pytest.approx((dice, iou))
    # symmetric
    assert dice_iou(label, pred) == pytest.approx((dice, iou))


def test_dice_iou_edge_cases():
    empty = np.zeros((2, 3, 4))
    full = np.ones((2, 3, 4))
    assert dice_iou(empty, empty) == (1.0, 1.0)  # both empty: defined as perfect
    assert dice_iou(empty, full) == (0.0, 0.0)
    assert dice_iou(full, empty) == (0.0, 0.0)
    assert dice_iou(full, full) == (1.0, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        dice_iou(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)))


def _rotated_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """A rotation about z, a flipped x axis and the given spacing: |det| = prod(spacing)."""
    c, s = math.cos(0.3), math.sin(0.3)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-spacing[0], spacing[1], spacing[2]])
    affine[:3, 3] = [10.0, -5.0, 3.0]
    return affine


def test_voxel_volume_from_affine():
    assert voxel_volume_from_affine(_rotated_affine((2.0, 1.5, 3.0))) == pytest.approx(9.0 / 1000)
    assert voxel_volume_from_affine(torch.diag(torch.tensor([0.5, 0.5, 2.0, 1.0]))) == pytest.approx(0.5 / 1000)
    with pytest.raises(ValueError, match="singular"):
        voxel_volume_from_affine(np.diag([1.0, 0.0, 1.0, 1.0]))


def _two_lesions_three_blobs() -> tuple[np.ndarray, np.ndarray]:
    label = np.zeros((10, 10, 10), dtype=bool)
    label[1:3, 1:3, 1:3] = True  # lesion A, 8 voxels
    label[6:8, 6:8, 6:8] = True  # lesion B, 8 voxels, never predicted -> false negative
    pred = np.zeros((10, 10, 10), dtype=bool)
    pred[2:4, 2:4, 2:4] = True  # blob 1, 8 voxels, overlaps A at (2, 2, 2)
    pred[4, 4, 4] = True  # blob 2, 1 voxel, corner-touches blob 1 at (3, 3, 3): same 26-component, own 6-component
    pred[0:2, 7:10, 0] = True  # blob 3, 6 voxels, far from any lesion -> false positive
    return pred, label


def test_fp_fn_volumes_26_connectivity_non_unit_spacing():
    pred, label = _two_lesions_three_blobs()
    vox_ml = voxel_volume_from_affine(_rotated_affine((2.0, 1.5, 3.0)))  # 9 mm³ = 0.009 ml
    fp, fn = lesion_fp_fn_volumes(pred, label, vox_ml)
    assert fp == pytest.approx(6 * 0.009)  # blob 3 only; blob 2 belongs to blob 1's component
    assert fn == pytest.approx(8 * 0.009)  # lesion B
    # with face connectivity the corner-touching voxel is a separate, unmatched component
    fp6, fn6 = lesion_fp_fn_volumes(pred, label, vox_ml, connectivity=6)
    assert fp6 == pytest.approx(7 * 0.009)
    assert fn6 == pytest.approx(8 * 0.009)
    # torch with a leading channel dim gives the same
    fp_t, fn_t = lesion_fp_fn_volumes(torch.from_numpy(pred)[None], torch.from_numpy(label)[None].float(), vox_ml)
    assert (fp_t, fn_t) == pytest.approx((fp, fn))


def test_fn_volume_counts_whole_component_through_diagonal_link():
    label = np.zeros((6, 6, 6), dtype=bool)
    label[0:2, 0:2, 0:2] = True  # 8 voxels
    label[2, 2, 2] = True  # corner-touches (1, 1, 1)
    pred = np.zeros((6, 6, 6), dtype=bool)
    pred[2, 2, 2] = True  # hits only the diagonal voxel
    assert lesion_fp_fn_volumes(pred, label, 0.001) == pytest.approx((0.0, 0.0))
    # 6-connectivity: the 8-voxel cube is its own missed lesion
    assert lesion_fp_fn_volumes(pred, label, 0.001, connectivity=6) == pytest.approx((0.0, 0.008))
    # partial detection never counts: any overlap clears the whole component
    pred[:] = False
    pred[0, 0, 0] = True
    pred[5, 5, 5] = True
    assert lesion_fp_fn_volumes(pred, label, 0.001) == pytest.approx((0.001, 0.0))


def test_fp_fn_volumes_empty_and_errors():
    empty = np.zeros((4, 4, 4))
    assert lesion_fp_fn_volumes(empty, empty, 0.004) == (0.0, 0.0)
    with pytest.raises(ValueError, match="connectivity"):
        lesion_fp_fn_volumes(empty, empty, 0.001, connectivity=8)
    with pytest.raises(ValueError, match="voxel volume"):
        lesion_fp_fn_volumes(empty, empty, 0.0)
    with pytest.raises(ValueError, match="3D"):
        lesion_fp_fn_volumes(np.zeros((4, 4)), np.zeros((4, 4)), 0.001)
    with pytest.raises(ValueError, match="same shape"):
        lesion_fp_fn_volumes(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), 0.001)
