"""MONAI Label studies folders: images at the top, final labels in ``labels/final`` under the image's name."""

from __future__ import annotations

import os

__all__ = ["LABELS_SUBDIR", "STUDY_SUFFIXES", "studies_datalist"]

LABELS_SUBDIR = os.path.join("labels", "final")
# the image types MONAI Label's local datastore lists that medfm's bundles read
STUDY_SUFFIXES = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg")


def _stem(name: str) -> str | None:
    lower = name.lower()
    return next((name[: -len(s)] for s in STUDY_SUFFIXES if lower.endswith(s)), None)


def studies_datalist(studies_dir: str, require_labels: bool = True) -> list[dict[str, str]]:
    """``[{"image", "label"}]`` of a MONAI Label studies folder, the pairs its ``/train`` passes a bundle.

    Images are the files of ``studies_dir`` with a suffix in :data:`STUDY_SUFFIXES`; the label of
    ``<id>.<ext>`` is the file ``labels/final/<id>.<any suffix>``. Paths are absolute, sorted by image.

    Args:
        studies_dir: the studies folder.
        require_labels: leave out studies without a final label (training needs them); with False they are
            listed with the image alone.

    Raises:
        FileNotFoundError: ``studies_dir`` does not exist.
        ValueError: no (labelled) study found, or a study has two final labels.
    """
    if not os.path.isdir(studies_dir):
        raise FileNotFoundError(f"studies folder {studies_dir} does not exist (or is not a directory).")
    root = os.path.abspath(studies_dir)
    label_dir = os.path.join(root, LABELS_SUBDIR)
    labels: dict[str, str] = {}
    for name in sorted(os.listdir(label_dir)) if os.path.isdir(label_dir) else []:
        stem = _stem(name)
        if stem is None:
            continue
        if stem in labels:
            raise ValueError(f"study {stem!r} has two final labels in {label_dir}: {labels[stem]} and {name}.")
        labels[stem] = name
    items = []
    for name in sorted(os.listdir(root)):
        stem = _stem(name)
        if stem is None or not os.path.isfile(os.path.join(root, name)):
            continue
        item = {"image": os.path.join(root, name)}
        if stem in labels:
            item["label"] = os.path.join(label_dir, labels[stem])
        elif require_labels:
            continue
        items.append(item)
    if not items:
        what = "labelled study (<id>.<ext> with labels/final/<id>.<ext>)" if require_labels else "study"
        raise ValueError(f"no {what} found in {studies_dir}.")
    return items
