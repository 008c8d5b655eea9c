"""Stack the PET and CT of an AutoPET-style dataset into one two-channel NIfTI per case (MONAI Label studies).

    python tools/petct_studies.py --dataset_dir /data/autopet3 --out studies [--images_subdir imagesTr] \\
        [--cases c1 c2 …] [--no-labels] [--overwrite]

Writes ``<out>/<case>.nii.gz`` (channel 0 PET in SUV, channel 1 CT in HU, on the PET grid) and each lesion
mask, on the same grid, to ``<out>/labels/final/<case>.nii.gz``, where MONAI Label's local datastore keeps
final labels.
"""

from __future__ import annotations

import argparse

from medfm.data import export_petct_studies


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset_dir", required=True, help="dataset root (imagesTr/<case>_0000|_0001.nii.gz, labelsTr)")
    p.add_argument("--out", required=True, help="studies folder to write")
    p.add_argument("--images_subdir", default="imagesTr")
    p.add_argument("--cases", nargs="*", default=None, help="case ids (default: all)")
    p.add_argument("--no-labels", action="store_true", help="do not copy the lesion masks")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        cases = export_petct_studies(
            args.dataset_dir, args.out, args.images_subdir, args.cases, labels=not args.no_labels,
            overwrite=args.overwrite,
        )  # fmt: skip
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        p.error(str(e))
    print(f"{len(cases)} studies written to {args.out}")


if __name__ == "__main__":
    main()
