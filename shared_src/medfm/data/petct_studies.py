"""Stacked PET/CT studies: one two-channel NIfTI per case, the form MONAI Label serves.

MONAI Label's datastore holds one image file per study, while AutoPET-style datasets keep PET and CT in
separate files. :func:`write_petct_study` stacks one case into a 4D NIfTI ``(X, Y, Z, 2)`` on the PET grid
(channel 0 PET in SUV, channel 1 CT in HU; the CT is resampled onto the PET grid when they differ), and
:func:`export_petct_studies` does it for a whole dataset, putting the lesion masks (on the PET grid too) where
MONAI Label's local datastore keeps final labels (``labels/final/<case>.nii.gz``).
:class:`medfm.transforms.PETCTChannelsd` reads the result.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..transforms.petct import LoadPETCTd
from .autopet import build_autopet_datalist
from .nifti import save_nifti
from .studies import LABELS_SUBDIR

__all__ = ["export_petct_studies", "write_petct_study"]


def write_petct_study(
    pet: str,
    ct: str,
    out_path: str,
    case: str = "<unknown case>",
    label: str | None = None,
    label_out: str | None = None,
) -> np.ndarray:
    """Write PET and CT of one case as a float32 4D NIfTI ``(X, Y, Z, 2)`` on the PET grid, and optionally
    its lesion mask on the same grid.

    The files are loaded and checked by :class:`medfm.transforms.LoadPETCTd` (errors name the case and
    file); a CT on another grid is resampled onto the PET grid (bilinear, air outside its field of view), a
    mask on another grid too (nearest neighbour), so study and label always share one grid.

    Args:
        pet: PET file (SUV).
        ct: CT file (HU).
        out_path: output ``.nii.gz``.
        case: case id for error messages.
        label: lesion mask file, written to ``label_out`` (both or neither).
        label_out: output ``.nii.gz`` of the mask, in the mask's stored dtype.

    Returns:
        The PET affine written.
    """
    if (label is None) != (label_out is None):
        raise ValueError(f"case {case}: label and label_out go together (got {label!r} and {label_out!r}).")
    loader = LoadPETCTd(keys=("ct", "pet"), reference_key="pet", label_key="label", grid_mismatch="resample")
    d = loader({"case": case, "ct": ct, "pet": pet, "label": label})
    stacked = np.stack([d["pet"][0].numpy(), d["ct"][0].numpy()], axis=-1).astype(np.float32)
    affine = np.asarray(d["pet"].affine.numpy(), dtype=np.float64)
    save_nifti(stacked, affine, out_path)
    if label_out is not None:
        save_nifti(d["label"][0].numpy(), affine, label_out)
    return affine


def export_petct_studies(
    dataset_dir: str,
    out_dir: str,
    images_subdir: str = "imagesTr",
    cases: Sequence[str] | None = None,
    labels: bool = True,
    overwrite: bool = False,
) -> list[str]:
    """Write ``<out_dir>/<case>.nii.gz`` stacked studies for the cases of an AutoPET-style dataset.

    Args:
        dataset_dir: dataset root in the layout of :func:`medfm.data.build_autopet_datalist`.
        out_dir: studies folder (MONAI Label's ``--studies``); created if needed.
        images_subdir: folder of the images in ``dataset_dir``.
        cases: case ids to write (all when ``None``).
        labels: also write each case's lesion mask, on the PET grid, to ``<out_dir>/labels/final/<case>.nii.gz``.
        overwrite: replace existing files instead of raising.

    Returns:
        The case ids written.

    Raises:
        ValueError: a requested case is not in the dataset.
        FileExistsError: an output exists and ``overwrite`` is False.
    """
    datalist = build_autopet_datalist(dataset_dir, images_subdir=images_subdir)
    by_case = {item["case"]: item for item in datalist}
    wanted = list(by_case) if cases is None else list(cases)
    unknown = [c for c in wanted if c not in by_case]
    if unknown:
        raise ValueError(f"cases {unknown} are not in {dataset_dir} (it holds {sorted(by_case)}).")
    outputs = {c: os.path.join(out_dir, f"{c}.nii.gz") for c in wanted}
    label_dir = os.path.join(out_dir, LABELS_SUBDIR)
    copies = {c: os.path.join(label_dir, f"{c}.nii.gz") for c in wanted if labels and "label" in by_case[c]}
    if not overwrite:
        for path in list(outputs.values()) + list(copies.values()):
            if os.path.exists(path):
                raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it.")
    os.makedirs(out_dir, exist_ok=True)
    if copies:
        os.makedirs(label_dir, exist_ok=True)
    for case in wanted:
        item = by_case[case]
        label = item["label"] if case in copies else None
        write_petct_study(item["pet"], item["ct"], outputs[case], case=case, label=label, label_out=copies.get(case))
    return wanted
