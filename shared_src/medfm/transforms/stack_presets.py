"""FratMAE's stack choices as one switch: whole-body coronal stacks or the axial-stack baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

__all__ = ["STACKS", "stack_settings"]

STACKS = ("coronal", "axial")


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
            raise ValueError(f"coronal stacks of {num_slices} slices every {factor} need Y >= {factor * num_slices}, got {y}.")
        return {"roi_size": [x, num_slices, z], "stack_axis": 1, "factor": factor}
    if num_slices > z:
        raise ValueError(f"axial stacks of {num_slices} slices need Z >= {num_slices}, got {z}.")
    return {"roi_size": [x, y, num_slices], "stack_axis": 2, "factor": 1}
