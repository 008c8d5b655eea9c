"""Write a bundle folder that MONAI Label's stock ``monaibundle`` app serves (``/infer``) and re-trains (``/train``).

    python tools/serve_bundle.py bundles/fratmae_petct --weights runs/seg/models/model.pt \\
        --out apps/monaibundle/model/fratmae_petct_segmentation [--task segmentation] [--demo] [--overwrite]

``--weights`` are fine-tuned weights of the task (e.g. ``runs/finetune_seg/models/model.pt``); ``--demo``
merges the bundle's demo overrides (the demo-size network). The served configs are the bundle's task
configs merged with its ``configs/serve_*.json`` overlays; see the bundle's docs for the server commands.
"""

from __future__ import annotations

import argparse

from medfm.utils import SERVED, build_served_bundle


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help=f"bundle folder; served bundles: {', '.join(sorted(SERVED))}")
    p.add_argument("--weights", required=True, help="fine-tuned weights to serve as models/model.pt")
    p.add_argument("--out", required=True, help="served bundle folder to write (apps/monaibundle/model/<name>)")
    p.add_argument("--task", default="segmentation", help="served task (default: segmentation)")
    p.add_argument("--demo", action="store_true", help="merge the bundle's demo overrides (demo-size network)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    args = p.parse_args(argv)
    try:
        out = build_served_bundle(args.bundle, args.weights, args.out, args.task, args.demo, args.overwrite)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        p.error(str(e))
    print(out)


if __name__ == "__main__":
    main()
