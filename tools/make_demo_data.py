#!/usr/bin/env python
"""Write synthetic demo data for a model, in the layout its real data uses.

Usage::

    python tools/make_demo_data.py fratmae --out DIR [--num-cases N] [--seed S]
    python tools/make_demo_data.py spad --out DIR [--num-2d N] [--num-3d N] [--slice-spacings 1 2.5 5] [--seed S]

One subcommand per model; add a ``_add_<model>`` parser builder and register it in ``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable, Sequence


def _run_fratmae(args: argparse.Namespace) -> int:
    """Generate synthetic whole-body PET/CT cases in the AutoPET III nnU-Net layout."""
    from medfm.data.synthetic_petct import generate_synthetic_petct

    start = time.perf_counter()
    cases = generate_synthetic_petct(
        args.out,
        num_cases=args.num_cases,
        shape=tuple(args.shape),
        spacing=tuple(args.spacing),
        seed=args.seed,
        write_organs=args.write_organs,
        overwrite=args.overwrite,
    )
    elapsed = time.perf_counter() - start
    out = os.path.abspath(args.out)
    print(f"Wrote {len(cases)} synthetic PET/CT cases to {out} in {elapsed:.1f} s")
    print(f"  shape {tuple(args.shape)} voxels, spacing {tuple(args.spacing)} mm")
    print("  imagesTr/<case>_0000.nii.gz (CT, HU), imagesTr/<case>_0001.nii.gz (PET, SUV), "
          "labelsTr/<case>.nii.gz (lesions), metadata.csv")  # fmt: skip
    with open(os.path.join(out, "metadata.csv"), newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            print(f"  {row['case']}: {row['tracer']:<4} {row['diagnosis']:<15} age {row['age']:>2} "
                  f"sex {row['sex']} stage {row['stage']}")  # fmt: skip
    return 0


def _add_fratmae(subparsers: argparse._SubParsersAction) -> None:
    from medfm.data.synthetic_petct import DEFAULT_SHAPE, DEFAULT_SPACING

    p = subparsers.add_parser("fratmae", help="synthetic whole-body PET/CT (AutoPET III layout) for FratMAE")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--num-cases", type=int, default=8, help="number of cases (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"),
                   help=f"volume shape in voxels (default {DEFAULT_SHAPE})")  # fmt: skip
    p.add_argument("--spacing", type=float, nargs=3, default=list(DEFAULT_SPACING), metavar=("SX", "SY", "SZ"),
                   help=f"voxel size in mm (default {DEFAULT_SPACING})")  # fmt: skip
    p.add_argument("--write-organs", action="store_true", help="also write organ maps to organsTr/")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=_run_fratmae)


def _run_spad(args: argparse.Namespace) -> int:
    """Generate mixed 2D/3D images with organ labels in the SPAD-ViT layout."""
    from medfm.data import SPAD_LABELS, build_spad_datalist, generate_synthetic_spad

    start = time.perf_counter()
    generate_synthetic_spad(
        args.out, num_2d=args.num_2d, num_3d=args.num_3d, slice_spacings=tuple(args.slice_spacings),
        size_2d=args.size_2d, size_3d=args.size_3d, seed=args.seed, overwrite=args.overwrite,
    )  # fmt: skip
    items = build_spad_datalist(args.out, require_labels=True, classes_file="classes.csv")
    print(f"Wrote {len(items)} synthetic images to {os.path.abspath(args.out)} in {time.perf_counter() - start:.1f} s")
    print(f"  labels {SPAD_LABELS}; classes.csv: 1 = lesion present")
    for item in items:
        print(f"  {os.path.basename(item['image']):<16} {item['dim']}D aniso_d {item['aniso_d']} "
              f"spacing {[round(s, 2) for s in item['spacing']]} class {item['class']}")  # fmt: skip
    return 0


def _add_spad(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("spad", help="synthetic 2D radiographs and 3D CT/MR volumes for SPAD-ViT")
    p.add_argument("--out", required=True, help="dataset directory to write")
    p.add_argument("--num-2d", type=int, default=6, help="2D images (default 6)")
    p.add_argument("--num-3d", type=int, default=6, help="3D volumes (default 6)")
    p.add_argument("--slice-spacings", type=float, nargs="+", default=[1.0, 2.5, 5.0],
                   help="slice spacings in mm the volumes cycle through (default 1 2.5 5)")  # fmt: skip
    p.add_argument("--size-2d", type=int, default=96, help="2D image side in pixels (default 96)")
    p.add_argument("--size-3d", type=int, default=64, help="volume in-plane side in 1 mm voxels (default 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=_run_spad)


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_fratmae, _add_spad]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen subcommand; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="model", required=True, metavar="MODEL")
    for add in _SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileExistsError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
