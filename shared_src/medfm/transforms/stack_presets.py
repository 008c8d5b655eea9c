"""FratMAE's stack choices as one switch: whole-body coronal stacks or the axial-stack baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

__all__ = ["SEGMENTATION_PATCHES", "STACKS", "segmentation_roi", "stack_settings"]

STACKS = ("coronal", "axial")
SEGMENTATION_PATCHES = (*STACKS, "cube")


def stack_settings(
    stack: Literal["coronal", "axial"], whole_body_size: Sequence[int], num_slices: int = 32, factor: int = 2
) -> dict:
    """Crop settings for :class:`~medfm.transforms.RandStackCropd` on a volume resized to ``whole_body_size``.

    Array order is RAS: X (left-right, the paper's W), Y (posterior-anterior, the paper's H), Z (feet-head,
    the paper's D).

    - ``coronal`` (FratMAE, Sec. 2.2): ``num_slices`` coronal slices taken every ``factor`` from a window of
      ``factor * num_slices`` along Y, full X and Z: the paper's 32(H) x 160(W) x 192(D) with k=2, i.e.
      ``roi_size = (X, num_slices, Z)``.
    - ``axial`` (the Table 2 baseline): ``num_slices`` consecutive axial slices, full X and Y:
      ``roi_size = (X, Y, num_slices)``, no subsampling (``factor`` ignored).

    Returns:
        ``{"roi_size": [...], "stack_axis": int, "factor": int}``.
    """
    if stack not in STACKS:
        raise ValueError(f"stack must be one of {STACKS}, got {stack!r}.")
    if len(whole_body_size) != 3:
        raise ValueError(f"whole_body_size must have 3 entries (X, Y, Z), got {list(whole_body_size)}.")
    if num_slices < 1 or factor < 1:
        raise ValueError(f"num_slices and factor must be positive, got {num_slices} and {factor}.")
    x, y, z = (int(s) for s in whole_body_size)
    if stack == "coronal":
        if factor * num_slices > y:
            raise ValueError(
                f"coronal stacks of {num_slices} slices every {factor} need Y >= {factor * num_slices}, got {y}."
            )
        return {"roi_size": [x, num_slices, z], "stack_axis": 1, "factor": factor}
    if num_slices > z:
        raise ValueError(f"axial stacks of {num_slices} slices need Z >= {num_slices}, got {z}.")
    return {"roi_size": [x, y, num_slices], "stack_axis": 2, "factor": 1}


def segmentation_roi(
    stack: Literal["coronal", "axial", "cube"],
    patch_extent: Sequence[int] = (160, 160, 192),
    num_slices: int = 32,
    cube_size: int = 96,
) -> list[int]:
    """Training / sliding-window patch of lesion segmentation at the scans' native resolution.

    The paper crops segmentation patches "from the original scans without resizing" and compares coronal- and
    axial-stack patches (its Table 2, without pre-training). At native resolution every slice is kept (a dense
    label cannot skip slices), so a stack is ``num_slices`` consecutive slices by ``patch_extent`` in the other two
    axes (RAS array order X, Y, Z as :func:`stack_settings`):

    - ``coronal`` (default): ``(X, num_slices, Z)``, the paper's 160 x 32 x 192 whole-body stacks;
    - ``axial`` (Table 2's baseline): ``(X, Y, num_slices)``, 160 x 160 x 32;
    - ``cube``: ``cube_size`` along every axis (96³, the common MONAI / UNETR patch).

    Returns:
        the patch size ``[X, Y, Z]``.
    """
    if stack not in SEGMENTATION_PATCHES:
        raise ValueError(f"stack must be one of {SEGMENTATION_PATCHES}, got {stack!r}.")
    if stack == "cube":
        if int(cube_size) < 1:
            raise ValueError(f"cube_size must be positive, got {cube_size}.")
        return [int(cube_size)] * 3
    return list(stack_settings(stack, patch_extent, num_slices, factor=1)["roi_size"])
