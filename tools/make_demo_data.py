#!/usr/bin/env python
"""Write synthetic demo data for a model, in the layout its real data uses.

Usage::

    python tools/make_demo_data.py fratmae --out DIR [--num-cases N] [--seed S]

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


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_fratmae]


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
