"""Writing NIfTI files (synthetic demo data, stacked PET/CT studies)."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

from ..utils.files import atomic_path

__all__ = ["save_nifti"]


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str) -> None:
    """Write ``array`` with ``affine`` (mm) as both qform and sform, keeping the array's dtype.

    The file is written under a hidden temporary name beside ``path`` and renamed into place, so a reader
    (a MONAI Label datastore watching the folder, say) never sees a partly written file.
    """
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    ext = ".nii.gz" if str(path).endswith(".nii.gz") else os.path.splitext(str(path))[1]
    with atomic_path(path, suffix=ext) as tmp:
        nib.save(img, tmp)
