"""Writing NIfTI files for the synthetic demo data."""

from __future__ import annotations

import nibabel as nib
import numpy as np

__all__ = ["save_nifti"]


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """Write ``array`` with ``affine`` (mm) as both qform and sform, keeping the array's dtype."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)
