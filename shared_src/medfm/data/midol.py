"""Datalists of 2D images in modality folders for M-IDoL (the demo set: :mod:`medfm.data.synthetic_midol`).

M-IDoL (Information Decomposition for multimodal representation Learning; public code LYH-hh/M-IDoL) pre-trains one 2D
backbone on X-ray, fundus, OCT, dermoscopy and pathology images. The layout read by
:func:`build_image_folder_datalist`::

    <dataset_dir>/<modality>/<name>.png|.jpg|.jpeg|.dcm       one 2D image (a .dcm file holds one slice);
                                                               sub-folders inside a modality folder are searched
    <dataset_dir>/classes.csv                                  optional table, columns ``image,class``, image
                                                               paths relative to ``dataset_dir``
                                                               (``dermoscopy/derm_000.png``)
    <dataset_dir>/<masks_subdir>/<modality>/<name>.png         optional segmentation mask with the image's stem

Modality names are :data:`MODALITIES` unless given. Each item's ``modality_index`` is the modality's position
in the ``modalities`` argument, so the default order gives 0 X-ray, 1 fundus, 2 OCT, 3 dermoscopy, 4 pathology.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from PIL import Image

from .spad import read_class_table

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "MODALITIES", "UNLABELLED", "build_image_folder_datalist", "find_modality_images"]

MODALITIES = ("xray", "fundus", "oct", "dermoscopy", "pathology")
"""The five M-IDoL modalities, in the order that sets ``modality_index``."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
"""Image file suffixes (case-insensitive); ``.dcm`` is a 2D DICOM (X-ray)."""

UNLABELLED = -1
"""``label`` of an image that ``classes_file`` does not list (only when labels are not required)."""


def _stem(name: str) -> str:
    """``name`` without its image suffix."""
    base, ext = os.path.splitext(name)
    return base if ext.lower() in IMAGE_SUFFIXES else name


def find_modality_images(modality_dir: str) -> tuple[list[str], list[str]]:
    """Images under one modality folder, and the files there that are not images.

    Hidden files and folders (``.name``) are skipped; sub-folders are searched.

    Args:
        modality_dir: the folder of one modality.

    Returns:
        ``(images, others)``: sorted paths relative to ``modality_dir`` of the files with a suffix in
        :data:`IMAGE_SUFFIXES`, and of all other files. A missing folder gives two empty lists.
    """
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(modality_dir):
        dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
        rel = os.path.relpath(dirpath, modality_dir)
        for f in filenames:
            if f.startswith("."):
                continue
            path = os.path.normpath(os.path.join(rel, f))
            (images if f.lower().endswith(IMAGE_SUFFIXES) else others).append(path)
    return sorted(images), sorted(others)


def _check_image(path: str) -> None:
    """Open the header of a 2D image (PIL for PNG/JPEG, ITK for DICOM); raise a ValueError naming the file."""
    try:
        if path.lower().endswith(".dcm"):
            import itk  # slow to import: only when DICOM is present

            reader = itk.ImageFileReader[itk.Image[itk.F, 3]].New(FileName=path)
            reader.SetImageIO(itk.GDCMImageIO.New())
            reader.UpdateOutputInformation()
            size = tuple(int(n) for n in reader.GetOutput().GetLargestPossibleRegion().GetSize())
            if size[2] != 1:
                raise ValueError(f"holds {size[2]} frames of {size[0]}x{size[1]}, expected one 2D image")
        else:
            with Image.open(path) as im:
                im.verify()
    except Exception as e:
        cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{path}: cannot read the image ({type(e).__name__}: {cause}).") from e


def _read_classes(path: str, images: Sequence[str], modalities: Sequence[str]) -> dict[str, int]:
    """Class per image from a CSV with columns ``image,class`` (paths relative to the dataset root).

    Rows of modalities that are not selected are ignored; a row naming a missing image of a selected modality
    is an error.
    """
    table = read_class_table(path)
    selected = set(modalities)
    unknown = sorted(r for r in set(table) - set(images) if r.split(os.sep)[0] in selected)
    if unknown:
        raise ValueError(f"{path}: no such image for {unknown[:5]} (paths are relative to the dataset folder).")
    return table


def _warn_unread_folders(root: str, modalities: Sequence[str], masks_subdir: str | None) -> None:
    """Say which folders of ``root`` hold images that this datalist leaves out (other modalities), and how many."""
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name.startswith(".") or name in modalities or name == masks_subdir or not os.path.isdir(folder):
            continue
        images, _ = find_modality_images(folder)
        if images:
            logger.warning(
                "skipped %d images in %s: the folder is not one of the modalities read here (%s)",
                len(images), folder, ", ".join(modalities),
            )  # fmt: skip


def build_image_folder_datalist(
    dataset_dir: str,
    modalities: Sequence[str] = MODALITIES,
    require_any: bool = True,
    classes_file: str | None = "classes.csv",
    masks_subdir: str | None = None,
    require_labels: bool = False,
    check_images: bool = True,
    unreadable: str = "raise",
) -> list[dict[str, Any]]:
    """Datalist of the 2D images in ``<dataset_dir>/<modality>/`` folders (layout: module doc).

    Folders of ``dataset_dir`` that are not among ``modalities`` (nor ``masks_subdir``) are not read; when they hold
    images, a warning names each folder and how many images it skips.

    Each item: ``image`` (absolute path), ``modality`` (its folder name), ``modality_index`` (position of the
    modality in ``modalities``), ``label`` (int, when a classes table is read; :data:`UNLABELLED` for an image
    it does not list unless ``require_labels``) and ``mask`` (absolute path of
    ``<dataset_dir>/<masks_subdir>/<modality>/<same folder>/<stem>.png``, when ``masks_subdir`` is given).

    Args:
        dataset_dir: dataset root.
        modalities: modality folder names to read, in ``modality_index`` order.
        require_any: ``True``: modality folders may be missing or empty as long as one image is found;
            ``False``: every modality in ``modalities`` must hold images.
        classes_file: CSV with columns ``image,class`` (a path, or a name inside ``dataset_dir``); read when it
            exists. ``None``: no labels.
        masks_subdir: folder of the masks inside ``dataset_dir``; when given, every image needs a mask.
        require_labels: the classes file must exist and list every image.
        check_images: open each image's header (catches unreadable files and multi-frame DICOM up front).
        unreadable: ``"raise"``: an unreadable image or a file of another type is an error; ``"record"`` (batch
            inference): it becomes an item with the reason under ``load_error``
            (:class:`medfm.data.FileErrorDataset` reports it as failed without loading it).

    Returns:
        The datalist, sorted by modality (in ``modalities`` order), then path.

    Raises:
        FileNotFoundError: ``dataset_dir`` does not exist, or ``classes_file`` does not while ``require_labels``.
        ValueError: no image at all (or a modality without images while not ``require_any``), a file with an
            unsupported suffix or an unreadable image (naming the file), a missing class or mask, a malformed
            classes table, repeated modality names.
    """
    if unreadable not in ("raise", "record"):
        raise ValueError(f"unreadable must be 'raise' or 'record', got {unreadable!r}.")
    root = os.path.abspath(dataset_dir)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"M-IDoL dataset directory {root} does not exist (or is not a directory).")
    modalities = tuple(str(m) for m in modalities)
    if not modalities or len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities must be distinct folder names, got {modalities}.")
    found: list[tuple[int, str, str]] = []  # (modality index, modality, path relative to root)
    rejected: list[tuple[int, str, str]] = []  # files of another type, kept as failed items with "record"
    for index, modality in enumerate(modalities):
        folder = os.path.join(root, modality)
        images, others = find_modality_images(folder)
        bad = []
        if others and unreadable == "record":
            bad = [os.path.normpath(os.path.join(modality, rel)) for rel in others]
        elif others:
            raise ValueError(
                f"{os.path.join(folder, others[0])}: unsupported file type ({len(others)} such files in {folder}); "
                f"images must end with one of {IMAGE_SUFFIXES}."
            )
        if not images and not require_any:
            raise ValueError(f"modality {modality!r} has no images in {folder} (require_any=False).")
        found += [(index, modality, os.path.normpath(os.path.join(modality, rel))) for rel in images]
        rejected += [(index, modality, rel) for rel in bad]
    _warn_unread_folders(root, modalities, masks_subdir)
    if not found:
        raise ValueError(
            f"Empty datalist: no image in {root}/<modality>/ for modalities {modalities} (expected "
            f".png/.jpg/.jpeg/.dcm files in folders named after the modalities)."
        )
    classes = None
    if classes_file is not None:
        path = classes_file if os.path.isfile(classes_file) else os.path.join(root, classes_file)
        if os.path.isfile(path):
            classes = _read_classes(path, [rel for _, _, rel in found], modalities)
        elif require_labels:
            raise FileNotFoundError(f"classes file {classes_file} does not exist (nor inside {root}).")
    elif require_labels:
        raise ValueError("require_labels=True needs a classes_file.")
    datalist: list[dict[str, Any]] = [
        {"image": os.path.join(root, rel), "modality": modality, "modality_index": index,
         "load_error": f"unsupported file type; images must end with one of {IMAGE_SUFFIXES}"}
        for index, modality, rel in rejected
    ]  # fmt: skip
    for index, modality, rel in found:
        item: dict[str, Any] = {"image": os.path.join(root, rel), "modality": modality, "modality_index": index}
        if check_images:
            try:
                _check_image(item["image"])
            except ValueError as e:
                if unreadable == "raise":
                    raise
                datalist.append({**item, "load_error": str(e)})
                continue
        if classes is not None:
            if rel not in classes and require_labels:
                raise ValueError(f"{path}: no class for image {rel} (require_labels=True).")
            item["label"] = classes.get(rel, UNLABELLED)
        if masks_subdir is not None:
            mask = os.path.join(root, masks_subdir, _stem(rel) + ".png")
            if not os.path.isfile(mask):
                raise ValueError(f"image {item['image']} has no mask {mask}.")
            item["mask"] = mask
        datalist.append(item)
    return datalist
