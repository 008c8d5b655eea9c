#!/usr/bin/env python
"""Check a dataset before a long run: read every file fully, in parallel threads, and report what would fail later.

Usage::

    python tools/check_data.py fratmae_petct /data/autopet [--images-subdir imagesTr] [--json report.json]
    python tools/check_data.py spad_vit /data/spad
    python tools/check_data.py midol_multimodal /data/midol [--modalities dermoscopy xray] [--masks-subdir masks]
    python tools/check_data.py panfm_panorgan /data/panfm

Each bundle's data layout (the one its configs read) is checked per file for: ``unreadable`` (corrupt, truncated,
not an image), ``non_finite`` voxels (NaN/Inf), ``wrong_dtype`` (complex voxels, which loading casts to real),
``wrong_shape`` (a 4D volume, a multi-channel scan, an RGB mask), ``too_small`` (an axis under one patch of the
model, the size its inference refuses), ``degenerate`` (an axis of one voxel, or a constant image),
``grid_mismatch`` (CT or label not on the PET's grid, a label not on its image's grid), ``label_values`` (values
outside the expected classes), ``duplicate`` (byte-identical images; labels may repeat) and ``missing_pair`` (a CT
without PET, a label without image, a listed file that does not exist). A summary table
goes to stdout; the exit status is 1 when anything is wrong. ``--json`` writes the full report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

BUNDLES = ("fratmae_petct", "spad_vit", "midol_multimodal", "panfm_panorgan")
KINDS = ("unreadable", "non_finite", "wrong_dtype", "wrong_shape", "too_small", "degenerate", "grid_mismatch",
         "label_values", "duplicate", "missing_pair")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles")


def _config_int(bundle: str, key: str, default: int) -> int:
    """A literal int of the bundle's ``inference.json`` (its patch size or class count), else ``default``."""
    try:
        with open(os.path.join(CONFIGS, bundle, "configs", "inference.json"), encoding="utf-8") as f:
            value = json.load(f).get(key, default)
    except OSError:
        return default
    return value if isinstance(value, int) else default


def _read(path: str) -> tuple[np.ndarray | None, np.ndarray | None, str | None, str | None]:
    """``(array, affine, sha1, error)`` of one file read fully as the bundles read it (MONAI ``LoadImage``,
    channel first)."""
    from monai.transforms import LoadImage

    sha1 = None
    try:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                sha1 = hashlib.sha1(f.read()).hexdigest()
        img = LoadImage(image_only=True, ensure_channel_first=True)(path)
        arr = np.asarray(img.detach().cpu().numpy())
        return arr, np.asarray(img.affine, dtype=np.float64), sha1, None
    except Exception as e:  # every way a file can fail to load is reported, none stops the check
        reason = " ".join(str(e).split("Traceback (most recent call last)")[0].split())[:300]
        return None, None, sha1, f"{type(e).__name__}: {reason}"


def _image_problems(
    arr: np.ndarray, path: str, min_size: Sequence[int], channels: Sequence[int], shape: Sequence[int] | None = None
) -> list[dict]:
    """Problems of one loaded image: channel count, non-finite voxels, sizes under ``min_size`` (trailing axes of
    ``shape``, by default the array's spatial shape), axes of one voxel, constant content."""
    out = []
    spatial = tuple(shape) if shape is not None else arr.shape[1:]
    if arr.shape[0] not in channels:
        out.append(("wrong_shape", f"{arr.shape[0]} channels (shape {arr.shape}); expected {list(channels)}"))
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        out.append(("non_finite", f"{int(arr.size - np.isfinite(arr).sum())} NaN/Inf voxels of {arr.size}"))
    tail = spatial[len(spatial) - len(min_size):] if min_size else ()
    if min_size and any(s < m for s, m in zip(tail, min_size)):
        out.append(("too_small", f"spatial shape {tuple(spatial)}; the model needs at least {tuple(min_size)}"))
    elif sum(s > 1 for s in spatial) < 2:
        out.append(("degenerate", f"spatial shape {tuple(spatial)}: fewer than two axes longer than one voxel"))
    elif arr.size and np.ptp(arr) == 0:
        out.append(("degenerate", "constant image (every voxel the same)"))
    return [{"file": path, "kind": k, "detail": d} for k, d in out]


def _label_problems(lab: np.ndarray, path: str, allowed: set[int], ref: Any | None) -> list[dict]:
    out = []
    if lab.shape[0] != 1:
        out.append(("wrong_shape", f"{lab.shape[0]} channels (shape {lab.shape}); a label is one grey channel"))
    values = np.unique(lab)
    extra = [int(v) if float(v).is_integer() else v for v in values.tolist() if v not in allowed]
    if extra:
        out.append(("label_values", f"values {extra[:10]} outside the expected {sorted(allowed)}"))
    if ref is not None and tuple(lab.shape[1:]) != tuple(ref.shape[1:]):
        out.append(("grid_mismatch", f"label shape {tuple(lab.shape[1:])} vs image {tuple(ref.shape[1:])}"))
    return [{"file": path, "kind": k, "detail": d} for k, d in out]


def check_unit(unit: dict[str, Any]) -> dict[str, Any]:
    """Read and check the files of one unit (a case, an image with its label, an organ file); returns
    ``{"problems": [...], "hashes": {path: sha1}}``."""
    problems, hashes, arrays = [], {}, {}
    for role in unit["read"]:
        path = unit[role]
        arr, affine, sha1, error = _read(path)
        if sha1 and role not in unit.get("labels", ()):
            hashes[path] = sha1
        if error:
            problems.append({"file": path, "kind": "unreadable", "detail": error})
            continue
        if path.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            dtype = nib.load(path).get_data_dtype()
            if dtype.kind == "c" or dtype.names:
                detail = f"voxel type {dtype} (loading keeps only the real part of complex values)"
                problems.append({"file": path, "kind": "wrong_dtype", "detail": detail})
        arrays[role] = (arr, affine)
        if role in unit.get("labels", ()):
            ref = None if role in unit.get("same_grid", ()) else arrays.get(unit["labels"][role], (None,))[0]
            problems += _label_problems(arr, path, set(unit["allowed"]), ref)
        else:
            problems += _image_problems(arr, path, unit["min_size"], unit["channels"], unit.get("layout_shape"))
    ref_role = unit.get("grid_ref")
    if ref_role in arrays:
        from medfm.transforms import grid_mismatch

        ref, ref_aff = arrays[ref_role]
        for role in unit.get("same_grid", ()):
            if role in arrays and arrays[role][0].ndim == ref.ndim:
                problem = grid_mismatch(arrays[role][0], ref, 1e-3, arrays[role][1], ref_aff)
                if problem:
                    problems.append({"file": unit[role], "kind": "grid_mismatch",
                                     "detail": f"not on the grid of {os.path.basename(unit[ref_role])}: "
                                               + " ".join(problem.split())})  # fmt: skip
    return {"problems": problems, "hashes": hashes}


def units_for(bundle: str, root: str, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The units to read and the dataset-level problems (missing pairs, files the layout cannot take)."""
    patch = args.patch_size or _config_int(bundle, "patch_size", 16)
    classes = args.num_classes or _config_int(bundle, "num_classes", 2)
    units, problems = [], []
    if bundle == "fratmae_petct":
        from medfm.data import find_petct_images

        ct, pet = find_petct_images(root, args.images_subdir or "imagesTr")
        labels_dir = os.path.join(root, args.labels_subdir or "labelsTr")
        for case in sorted(set(ct) | set(pet)):
            if case not in ct or case not in pet:
                have = ct.get(case) or pet.get(case)
                lacks = "CT (_0000)" if case not in ct else "PET (_0001)"
                problems.append({"file": have, "kind": "missing_pair", "detail": f"case {case} has no {lacks}"})
                continue
            unit = {"case": case, "ct": ct[case], "pet": pet[case], "read": ["pet", "ct"], "min_size": [patch] * 3,
                    "channels": [1], "grid_ref": "pet", "same_grid": ["ct"]}  # fmt: skip
            label = next((os.path.join(labels_dir, case + s) for s in (".nii.gz", ".nii")
                          if os.path.isfile(os.path.join(labels_dir, case + s))), None)  # fmt: skip
            if label:
                unit.update(label=label, labels={"label": "pet"}, allowed=range(classes), same_grid=["ct", "label"])
                unit["read"].append("label")
            units.append(unit)
        if os.path.isdir(labels_dir):
            for name in sorted(os.listdir(labels_dir)):
                case = name.split(".nii")[0]
                if not name.startswith(".") and case not in ct and case not in pet:
                    problems.append({"file": os.path.join(labels_dir, name), "kind": "missing_pair",
                                     "detail": f"label of case {case}, which has no images"})  # fmt: skip
    elif bundle in ("spad_vit", "midol_multimodal"):
        from medfm.data import build_image_folder_datalist, build_spad_datalist

        if bundle == "spad_vit":
            items = build_spad_datalist(root, images_subdir=args.images_subdir or "images", unreadable="record")
            min_size, channels, allowed, key = [1, patch, patch], [1, 2, 3, 4], range(classes), "label"
            labels_dir = os.path.join(root, args.labels_subdir or "labels")
            images = {os.path.basename(str(d["image"])).split(".")[0] for d in items}
            for name in sorted(os.listdir(labels_dir)) if os.path.isdir(labels_dir) else []:
                if not name.startswith(".") and name.split(".")[0] not in images:
                    problems.append({"file": os.path.join(labels_dir, name), "kind": "missing_pair",
                                     "detail": "label without an image of the same name"})  # fmt: skip
        else:
            modalities = args.modalities or ["dermoscopy"]
            items = build_image_folder_datalist(root, modalities=modalities, unreadable="record")
            masks = args.masks_subdir
            for d in items if masks else []:
                mask = os.path.join(root, masks, os.path.relpath(str(d["image"]), root)).rsplit(".", 1)[0] + ".png"
                if os.path.isfile(mask):
                    d["mask"] = mask
                else:
                    problems.append({"file": d["image"], "kind": "missing_pair", "detail": f"no mask {mask}"})
            min_size, channels, allowed, key = [1, 1], [1, 2, 3, 4], {0, 1, 255}, "mask"
        for d in items:
            if d.get("load_error"):
                detail = str(d["load_error"]).removeprefix(f"{d['image']}: ")
                problems.append({"file": d["image"], "kind": "unreadable", "detail": detail})
                continue
            unit = {"image": str(d["image"]), "read": ["image"], "min_size": min_size, "channels": channels}
            if bundle == "spad_vit" and d.get("intensity") != "uint8":
                unit["channels"] = [1, 3]  # grey + alpha and RGBA only for 8-bit natural images (ToRGBd)
            if "shape" in d:  # SPAD-ViT: sizes depth first, as the network sees them (header of the datalist)
                unit["layout_shape"] = [int(n) for n in d["shape"]]
            if d.get(key):
                unit.update({key: str(d[key]), "labels": {key: "image"}, "allowed": allowed})
                unit["read"].append(key)
            units.append(unit)
    else:
        import csv

        from medfm.data import ORGANS, PANFM_TABLE

        table = os.path.join(root, PANFM_TABLE)
        if not os.path.isfile(table):
            return [], [{"file": table, "kind": "missing_pair", "detail": "no subject table"}]
        with open(table, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            subject = row.get("subject", "?")
            for col, value in row.items():
                value = (value or "").strip()
                if col in ORGANS and value:
                    path = value if os.path.isabs(value) else os.path.join(root, value)
                    if os.path.isfile(path):
                        units.append({"image": path, "read": ["image"], "min_size": [], "channels": [1]})
                    else:
                        problems.append({"file": path, "kind": "missing_pair",
                                         "detail": f"subject {subject}: {col} file listed but missing"})  # fmt: skip
                elif col not in ORGANS and col != "subject" and value not in ("", "0", "1"):
                    detail = f"subject {subject}: label {col}={value!r}, expected 0 or 1"
                    problems.append({"file": table, "kind": "label_values", "detail": detail})
    return units, problems


def check_dataset(bundle: str, root: str, args: argparse.Namespace, progress: bool = True) -> dict[str, Any]:
    """Run every check; returns the report ``{"bundle", "dataset_dir", "files", "problems", "summary", "ok"}``."""
    units, problems = units_for(bundle, os.path.abspath(root), args)
    workers = max(1, args.workers)
    if workers == 1:
        results = map(check_unit, units)
    else:
        pool = ThreadPoolExecutor(workers)  # decompression and the array checks release the GIL
        results = pool.map(check_unit, units, chunksize=1)
    if progress:
        from tqdm import tqdm

        results = tqdm(results, total=len(units), desc=f"reading {bundle} files", unit="item", file=sys.stderr)
    hashes: dict[str, str] = {}
    for res in results:
        problems += res["problems"]
        hashes.update(res["hashes"])
    if workers > 1:
        pool.shutdown()
    first: dict[str, str] = {}
    for path in sorted(hashes):
        if hashes[path] in first:
            problems.append({"file": path, "kind": "duplicate", "detail": f"same bytes as {first[hashes[path]]}"})
        else:
            first[hashes[path]] = path
    problems.sort(key=lambda p: (str(p["file"]), KINDS.index(p["kind"])))
    counts = Counter(p["kind"] for p in problems)
    return {"bundle": bundle, "dataset_dir": os.path.abspath(root), "files": len(hashes), "units": len(units),
            "problems": problems, "summary": {k: counts.get(k, 0) for k in KINDS}, "ok": not problems}  # fmt: skip


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['bundle']}: {report['files']} files read from {report['dataset_dir']}", "",
             f"{'check':<14} {'files':>6}", f"{'-' * 14} {'-' * 6}"]  # fmt: skip
    lines += [f"{k:<14} {n:>6}" for k, n in report["summary"].items()]
    if report["problems"]:
        lines += ["", "problems:"] + [f"  {p['kind']:<13} {p['file']}: {p['detail']}" for p in report["problems"]]
    n = len(report["problems"])
    lines += ["", "OK" if report["ok"] else f"{n} problem{'s' if n > 1 else ''} found: fix or remove these files"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", choices=BUNDLES)
    parser.add_argument("dataset_dir")
    parser.add_argument("--json", help="write the full report to this file")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel readers")
    parser.add_argument("--images-subdir", help="images folder (fratmae: imagesTr, spad: images)")
    parser.add_argument("--labels-subdir", help="labels folder (fratmae: labelsTr, spad: labels)")
    parser.add_argument("--modalities", nargs="+", help="M-IDoL modality folders (default: dermoscopy)")
    parser.add_argument("--masks-subdir", help="M-IDoL masks folder (e.g. masks), checked when given")
    parser.add_argument("--patch-size", type=int, help="the model's patch (default: the bundle's inference.json)")
    parser.add_argument("--num-classes", type=int, help="label classes (default: the bundle's inference.json)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.dataset_dir):
        print(f"{args.dataset_dir} is not a directory", file=sys.stderr)
        return 2
    report = check_dataset(args.bundle, args.dataset_dir, args, progress=not args.no_progress)
    print(format_report(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
