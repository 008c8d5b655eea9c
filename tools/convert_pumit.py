#!/usr/bin/env python
"""Import the SPAD-Nets authors' released checkpoints (PUMIT release v1) into medfm's SPAD-ViT bundle.

Usage::

    python tools/convert_pumit.py --vit pumit-b.ckpt --tokenizer simple-soft.ckpt --out-dir bundles/spad_vit/models

Writes ``spad_vit_mim.pt`` (weights of ``medfm.networks.nets.SpadViTMIM``: ViT-B, mask token and MIM head, the
``pretrained_checkpoint`` a fine-tuning config takes) and ``spad_vt.pt`` (``medfm.networks.nets.SpadVT``, the
``tokenizer_ckpt`` of MIM pre-training). Prints what was converted and every unmatched key; exits 1 when a key
is unmatched or a shape differs (nothing is written then), unless ``--allow-partial``.
Sizes other than the release's (ViT-B, SPAD-VT 1024 x 512) can be given with ``--vit-kwargs``/``--tokenizer-kwargs``
as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence


def _convert(kind: str, path: str, kwargs: dict, out: str, allow_partial: bool) -> bool:

    from medfm.engines.checkpoint import atomic_torch_save
    from medfm.networks.nets.spad_vit import SpadViTMIM
    from medfm.networks.nets.spad_vt import SpadVT
    from medfm.networks.pumit_release import convert_pumit_tokenizer, convert_pumit_vit, read_release_checkpoint

    if kind == "vit":
        model, convert, key = SpadViTMIM(**kwargs), convert_pumit_vit, "state_dict"
    else:
        model, convert, key = SpadVT(**kwargs), convert_pumit_tokenizer, "model"
    state = read_release_checkpoint(path, None)
    report = convert(state, model)
    print(f"[{kind}] {path}\n{report.summary()}")
    if not report.ok and not allow_partial:
        print(f"[{kind}] not written: unmatched keys or shapes (use --allow-partial to write what matched)")
        return False
    model.load_state_dict(report.converted, strict=report.ok)
    atomic_torch_save(model.state_dict(), out)
    print(f"[{kind}] wrote {out} ({key} of the release -> {type(model).__name__})")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vit", help="released ViT checkpoint (pumit-b.ckpt)")
    p.add_argument("--tokenizer", help="released tokenizer checkpoint (simple-soft.ckpt)")
    p.add_argument("--out-dir", required=True, help="where to write spad_vit_mim.pt and spad_vt.pt")
    p.add_argument("--vit-kwargs", default="{}", help="JSON keyword arguments of SpadViTMIM (default: ViT-B)")
    p.add_argument("--tokenizer-kwargs", default="{}", help="JSON keyword arguments of SpadVT (default: release)")
    p.add_argument("--allow-partial", action="store_true", help="write even when some keys are unmatched")
    args = p.parse_args(argv)
    if not args.vit and not args.tokenizer:
        p.error("give --vit and/or --tokenizer")
    os.makedirs(args.out_dir, exist_ok=True)
    ok = True
    for kind, path, kw, name in (
        ("vit", args.vit, args.vit_kwargs, "spad_vit_mim.pt"),
        ("tokenizer", args.tokenizer, args.tokenizer_kwargs, "spad_vt.pt"),
    ):
        if path:
            try:
                kwargs = json.loads(kw)
            except json.JSONDecodeError as e:
                p.error(f"--{kind}-kwargs is not JSON: {e}")
            ok &= _convert(kind, path, kwargs, os.path.join(args.out_dir, name), args.allow_partial)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
