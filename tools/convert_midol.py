#!/usr/bin/env python
"""Import the M-IDoL authors' released backbone (M-IDoL.pth) into medfm's SwinBackbone.

Usage::

    python tools/convert_midol.py --ckpt M-IDoL.pth --out bundles/midol_multimodal/models/midol_swin_b.pt

Writes the state dict of ``medfm.networks.blocks.SwinBackbone`` (Swin-B by default; other sizes with
``--backbone-kwargs`` as JSON). A DINO-style checkpoint with ``teacher``/``student`` entries gives the teacher
unless ``--which student``; its ``head.*`` (the MoE projector) is listed and left out. Prints what was converted
and every unmatched key; exits 1 when a backbone key is unmatched or a shape differs (nothing is written then),
unless ``--allow-partial``. The file is read with
``weights_only=True``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="released checkpoint (M-IDoL.pth)")
    p.add_argument("--out", required=True, help="file to write the SwinBackbone state dict to")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher", help="network of a DINO checkpoint")
    p.add_argument("--backbone-kwargs", default="{}", help="JSON keyword arguments of SwinBackbone (default: Swin-B)")
    p.add_argument("--allow-partial", action="store_true", help="write even when some keys are unmatched")
    args = p.parse_args(argv)
    try:
        kwargs = json.loads(args.backbone_kwargs)
    except json.JSONDecodeError as e:
        p.error(f"--backbone-kwargs is not JSON: {e}")
    if not isinstance(kwargs, dict):
        p.error(f"--backbone-kwargs must be a JSON object, got {args.backbone_kwargs}")

    from medfm.engines.checkpoint import atomic_torch_save
    from medfm.networks.blocks.swin import SwinBackbone
    from medfm.networks.midol_release import convert_midol_backbone, read_midol_checkpoint

    try:
        model = SwinBackbone(**kwargs)
        state = read_midol_checkpoint(args.ckpt, args.which)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = convert_midol_backbone(state, model, args.which)
    print(f"{args.ckpt} ({args.which} if nested)\n{report.summary()}")
    if not report.backbone_ok and not args.allow_partial:
        print("not written: unmatched keys or shapes (use --allow-partial to write what matched)")
        return 1
    if report.shape_mismatch:  # --allow-partial: keep the model's own tensors where shapes differ
        bad = {m.split(":")[0] for m in report.shape_mismatch}
        report.converted = {k: v for k, v in report.converted.items() if k not in bad}
    model.load_state_dict(report.converted, strict=report.backbone_ok)
    atomic_torch_save(model.state_dict(), args.out)
    print(f"wrote {args.out} ({len(report.converted)} tensors -> SwinBackbone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
