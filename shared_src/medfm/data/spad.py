"""Datalists of mixed 2D images and 3D volumes for SPAD-ViT (the demo set: :mod:`medfm.data.synthetic_spad`).

SPAD-ViT (SPAD-Nets, `arXiv:2312.07630 <https://arxiv.org/abs/2312.07630>`_) trains one network on 2D images and
3D volumes of any spacing. The layout read by :func:`build_spad_datalist`::

    <dataset_dir>/images/<name>.png|.jpg|.jpeg|.dcm   2D images (a .dcm file holds one slice)
    <dataset_dir>/images/<name>.nii|.nii.gz          3D volumes (2D if one axis has size 1)
    <dataset_dir>/images/<name>/*.dcm                a DICOM series (one volume per sub-directory)
    <dataset_dir>/labels/<name>.<any of the above>   optional label with the image's stem
    <dataset_dir>/classes.csv                        optional table with columns ``image,class``

Each item's ``aniso_d`` and depth-first ``spacing`` come from the file header through
:func:`medfm.transforms.spad.spad_layout`, the rule :class:`medfm.transforms.spad.ReorientToDepthd` applies
after loading, so an :class:`medfm.data.aniso_sampler.AnisoBatchSampler` built from the datalist batches
exactly the levels the network sees.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
from monai.transforms import MapTransform
from PIL import Image

from medfm.transforms.spad import spad_layout
from medfm.transforms.spad_input import spad_limit_in_plane

__all__ = ["SpadHeaderd", "build_spad_datalist", "find_spad_images", "read_class_table", "with_spad_headers"]

_SUFFIXES_2D = (".png", ".jpg", ".jpeg")
_SUFFIXES_NIFTI = (".nii.gz", ".nii")
_SUFFIXES = _SUFFIXES_2D + _SUFFIXES_NIFTI + (".dcm",)
_MODES_8BIT = {"L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr"}


def _stem(name: str) -> str:
    """``name`` without its image suffix (``.nii.gz`` counts as one)."""
    lower = name.lower()
    for suffix in _SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_spad_images(images_dir: str) -> list[str]:
    """Images under ``images_dir``, as sorted paths relative to it.

    Files with a supported suffix (``.png .jpg .jpeg .nii .nii.gz .dcm``) are images; a sub-directory holding
    ``.dcm`` files is one DICOM series (listed as the directory, not searched further). Hidden entries are
    skipped. A missing directory gives an empty list.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(images_dir):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        rel = os.path.relpath(dirpath, images_dir)
        files = [f for f in filenames if not f.startswith(".")]
        if rel != "." and any(f.lower().endswith(".dcm") for f in files):
            found.append(rel)
            dirnames[:] = []
            continue
        found += [os.path.normpath(os.path.join(rel, f)) for f in files if f.lower().endswith(_SUFFIXES)]
    return sorted(found)


def _itk_header(path: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Size and spacing ``(x, y, z)`` of a DICOM file or series directory from ITK, without the pixel data."""
    import itk  # slow to import: only when DICOM is present

    image_type = itk.Image[itk.F, 3]
    if os.path.isdir(path):
        names = itk.GDCMSeriesFileNames.New(Directory=path)
        uids = list(names.GetSeriesUIDs())
        if len(uids) != 1:
            raise ValueError(f"holds {len(uids)} DICOM series; put each series in its own directory")
        reader = itk.ImageSeriesReader[image_type].New(FileNames=names.GetFileNames(uids[0]))
    else:
        reader = itk.ImageFileReader[image_type].New(FileName=path)
    reader.SetImageIO(itk.GDCMImageIO.New())
    reader.UpdateOutputInformation()
    out = reader.GetOutput()
    return tuple(int(n) for n in out.GetLargestPossibleRegion().GetSize()), tuple(float(s) for s in out.GetSpacing())


def _read_header(path: str, max_in_plane: int | None = None) -> dict[str, Any]:
    """``aniso_d``, ``spacing``, ``shape``, ``dim`` and ``intensity`` of one image from its header (array axes as the
    transforms present them: volumes as MONAI loads them, 2D files rows first)."""
    lower = path.lower()
    intensity = "percentile"
    try:
        if lower.endswith(_SUFFIXES_2D):
            with Image.open(path) as im:
                shape, spacing = (im.size[1], im.size[0]), (1.0, 1.0)  # rows first, as RowsFirstd; spacing 1
                intensity = "uint8" if im.mode in _MODES_8BIT else "percentile"
        elif lower.endswith(_SUFFIXES_NIFTI):
            img = nib.load(path)
            shape = tuple(int(n) for n in img.shape[:3])
            spacing = tuple(float(s) for s in np.linalg.norm(img.affine[:3, : len(shape)], axis=0))
        else:
            shape, spacing = _itk_header(path)
            if shape[2] == 1 and not os.path.isdir(path):  # a 2D DICOM: rows first, as RowsFirstd presents it
                shape, spacing = (shape[1], shape[0], 1), (spacing[1], spacing[0], spacing[2])
        layout = spad_layout(shape, spacing)
    except Exception as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: cannot read the image header ({type(e).__name__}: {cause}).") from e
    full = [*shape, 1] if len(shape) == 2 else list(shape)
    shape_dhw = [int(full[a]) for a in layout.axes]
    aniso_d, spacing_dhw = layout.aniso_d, list(layout.spacing)
    if max_in_plane is not None:  # the size limit of the pre-training pipeline (LimitInPlaneSized)
        shape_dhw, spacing_dhw, aniso_d = spad_limit_in_plane(shape_dhw, spacing_dhw, max_in_plane)
    return {
        "aniso_d": aniso_d,
        "spacing": spacing_dhw,
        "shape": shape_dhw,
        "dim": layout.dim,
        "intensity": intensity,
    }


def _find_label(labels_dir: str, rel: str) -> str | None:
    """The label of image ``rel``: ``labels_dir/<same folder>/<same stem>`` with any image suffix, or a folder."""
    folder, stem = os.path.dirname(rel), _stem(os.path.basename(rel))
    base = os.path.join(labels_dir, folder, stem)
    hits = [base + s for s in _SUFFIXES if os.path.isfile(base + s)] + ([base] if os.path.isdir(base) else [])
    if len(hits) > 1:
        raise ValueError(f"image {rel} has several labels: {', '.join(hits)}; keep one.")
    return hits[0] if hits else None


def read_class_table(path: str) -> dict[str, int]:
    """``{normalised image path: class}`` from a CSV with columns ``image,class``; a missing column, a class that
    is not an integer or an image listed twice is a ValueError naming the file and line."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"image", "class"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{path}: needs the columns 'image' and 'class', got {reader.fieldnames}.")
        table: dict[str, int] = {}
        for n, row in enumerate(reader, start=2):
            name = os.path.normpath((row["image"] or "").strip())
            try:
                cls = int(str(row["class"]).strip())
            except ValueError:
                raise ValueError(f"{path}, line {n}: class {row['class']!r} of {name} is not an integer.") from None
            if name in table:
                raise ValueError(f"{path}, line {n}: {name} is listed twice.")
            table[name] = cls
    return table


def _read_classes(path: str, images: Sequence[str]) -> dict[str, int]:
    """Class per image from a CSV with columns ``image,class`` (names relative to the images folder)."""
    table = read_class_table(path)
    unknown = sorted(set(table) - set(images))
    if unknown:
        raise ValueError(f"{path}: no such image for {unknown[:5]} (names are relative to the images folder).")
    missing = [r for r in images if r not in table]
    if missing:
        raise ValueError(f"{path}: no class for image {missing[0]} ({len(missing)} images unlisted).")
    return table


def build_spad_datalist(
    dataset_dir: str,
    images_subdir: str = "images",
    labels_subdir: str = "labels",
    require_labels: bool = False,
    classes_file: str | None = None,
    max_in_plane: int | None = None,
    unreadable: str = "raise",
) -> list[dict[str, Any]]:
    """Datalist of the 2D images and 3D volumes under ``<dataset_dir>/<images_subdir>`` (layout: module doc).

    Headers are read without the voxel data (PIL for PNG/JPEG, nibabel for NIfTI, ITK for DICOM). Each item:
    ``image`` (absolute path; a DICOM series is its directory), ``label`` (when a label with the image's stem
    exists in ``labels_subdir``), ``aniso_d`` (int), ``spacing`` (``[s_d, s_h, s_w]`` mm, depth first after
    :class:`medfm.transforms.spad.ReorientToDepthd`; for 2D ``s_d`` is the nominal ``32 * min(s_h, s_w)``),
    ``shape`` (``[D, H, W]`` in the same layout; depth 1 for 2D), ``dim`` (2 or 3), ``intensity``
    (``"uint8"`` for 8-bit PNG/JPEG, else ``"percentile"``) and ``class``
    (int, with ``classes_file``).

    Args:
        dataset_dir: dataset root.
        images_subdir: folder of the images inside ``dataset_dir``.
        labels_subdir: folder of the labels inside ``dataset_dir``.
        require_labels: raise if an image has no label.
        classes_file: CSV with columns ``image,class`` (image names relative to the images folder), a path
            or a name inside ``dataset_dir``; every image must be listed.
        max_in_plane: the shorter in-plane side a pipeline limits images to
            (:class:`medfm.transforms.LimitInPlaneSized`): ``aniso_d``, ``spacing`` and ``shape`` are then given
            after that resize. ``None``: as in the file.
        unreadable: ``"raise"``: an unreadable header is an error; ``"record"`` (batch inference): the item keeps
            ``image`` (and ``label``) with the reason under ``load_error`` instead of the header fields
            (:class:`medfm.data.FileErrorDataset` reports it as failed without loading it).

    Returns:
        The datalist, sorted by image path.

    Raises:
        FileNotFoundError: ``dataset_dir``, its images folder or ``classes_file`` does not exist.
        ValueError: no image found, a label missing while ``require_labels``, an unreadable header (naming the
            file), or a malformed classes table.
    """
    if unreadable not in ("raise", "record"):
        raise ValueError(f"unreadable must be 'raise' or 'record', got {unreadable!r}.")
    root = os.path.abspath(dataset_dir)
    images_dir, labels_dir = os.path.join(root, images_subdir), os.path.join(root, labels_subdir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"SPAD dataset directory {root} does not exist (or is not a directory).")
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"SPAD dataset {root} has no images folder {images_dir}.")
    images = find_spad_images(images_dir)
    if not images:
        raise ValueError(
            f"Empty datalist: no image in {images_dir} (expected .png/.jpg/.jpeg/.dcm, .nii/.nii.gz or "
            "sub-directories of .dcm files)."
        )
    classes = None
    if classes_file is not None:
        path = classes_file if os.path.isfile(classes_file) else os.path.join(root, classes_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"classes file {classes_file} does not exist (nor inside {root}).")
        classes = _read_classes(path, images)
    datalist = []
    for rel in images:
        item: dict[str, Any] = {"image": os.path.join(images_dir, rel)}
        label = _find_label(labels_dir, rel)
        if label is not None:
            item["label"] = label
        elif require_labels:
            raise ValueError(f"image {item['image']} has no label {os.path.join(labels_dir, _stem(rel))}.* .")
        try:
            item.update(_read_header(item["image"], max_in_plane))
        except ValueError as e:
            if unreadable == "raise":
                raise
            item["load_error"] = str(e)
        if classes is not None:
            item["class"] = classes[rel]
        datalist.append(item)
    return datalist


def with_spad_headers(datalist: Sequence[Mapping[str, Any]], key: str = "image") -> list[dict[str, Any]]:
    """Copies of ``datalist`` items with the header fields :func:`build_spad_datalist` gives (``aniso_d``,
    ``spacing``, ``shape``, ``dim``, ``intensity``) filled in from ``item[key]`` where absent, e.g. for the
    ``{"image", "label"}`` pairs MONAI Label's ``/train`` passes. Errors name the file."""
    return [{**_read_header(str(item[key])), **item} for item in datalist]


class SpadHeaderd(MapTransform):
    """Fill in the datalist header fields (``aniso_d``, ``spacing``, ``shape``, ``dim``, ``intensity``) of a sample from
    the file under ``keys`` before it is loaded; fields already present are kept.

    The first transform of a served SPAD-ViT config: MONAI Label passes ``{"image": path}`` alone, and without
    ``intensity`` an 8-bit PNG/JPEG would be normalised by percentiles instead of by 255 as in training.
    """

    def __init__(self, keys: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], (str, os.PathLike)):
                for field, value in _read_header(os.fspath(d[key])).items():
                    d.setdefault(field, value)
        return d
