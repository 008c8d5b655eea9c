#!/usr/bin/env python
"""SPAD-ViT transfer at demo scale: MIM pre-trained vs scratch, and 2D-only pre-training vs scratch, on 3D
segmentation with few labels.

    python tools/spad_transfer.py [--seeds 0 1 2] [--label-fraction 0.2] [--mim-steps 200] [--seg-steps 60]
                                  [--out-dir DIR] [--write-docs]

Synthetic data (:func:`medfm.data.generate_synthetic_spad`): a mixed pre-training set (6 PNGs + 6 volumes at
1 / 2.5 / 5 mm slices, seed 0), a 2D-only pre-training set (12 PNGs, seed 0) and a separate 3D segmentation
set (12 volumes, seed 1). For each pre-training set: the tokenizer (``train.json`` + ``demo.json`` +
``train_tokenizer.json`` + ``demo_tokenizer.json``) and MIM (``train.json`` + ``demo.json``), once. Then for each seed:
fine-tuning (``finetune_seg.json`` + ``demo.json`` + ``demo_seg.json``, ``label_fraction`` of the training split, the
seed also drawing the split) from each MIM checkpoint and from scratch (``pretrained_checkpoint none``); the score is
the mean Dice (background excluded) of the last validation. Prints a Markdown table with means, 95% t-intervals over
seeds and the paired differences; ``--write-docs`` puts it into ``bundles/spad_vit/docs/README.md`` between
``<!-- transfer:start -->`` and ``<!-- transfer:end -->``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "spad_vit"
DOCS = BUNDLE / "docs" / "README.md"
START, END = "<!-- transfer:start -->", "<!-- transfer:end -->"
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _run(names: Sequence[str], **override: object) -> None:
    """Run a bundle workflow in this process (configs merged in order, top-level ids overridden)."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / n) for n in names],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        **override,
    )
    wf.initialize()
    try:
        wf.run()
    finally:
        wf.finalize()


def _last_val_dice(log_dir: str) -> float:
    """The last ``val_mean_dice`` written to TensorBoard under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for name in sorted(os.listdir(log_dir)):
        if name.startswith("events.out.tfevents"):
            acc = EventAccumulator(os.path.join(log_dir, name))
            acc.Reload()
            if "val_mean_dice" in acc.Tags()["scalars"]:
                events += [(e.wall_time, e.step, e.value) for e in acc.Scalars("val_mean_dice")]
    if not events:
        raise RuntimeError(f"no val_mean_dice in {log_dir}")
    return float(max(events)[2])


def _ci(values: Sequence[float]) -> str:
    """``mean [low, high]`` with a 95% t-interval over the values."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return f"{v.mean():.3f}"
    half = T95.get(len(v) - 1, 1.96) * v.std(ddof=1) / math.sqrt(len(v))
    return f"{v.mean():.3f} [{v.mean() - half:.3f}, {v.mean() + half:.3f}]"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--label-fraction", type=float, default=0.2)
    ap.add_argument("--mim-steps", type=int, default=200)
    ap.add_argument("--tokenizer-steps", type=int, default=60)
    ap.add_argument("--seg-steps", type=int, default=60)
    ap.add_argument("--out-dir", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args(argv)
    from medfm.data import generate_synthetic_spad

    t0 = time.time()
    root = args.out_dir or tempfile.mkdtemp(prefix="spad_transfer_")
    data = {k: os.path.join(root, "data", k) for k in ("mixed", "2d", "seg3d")}
    for key, kw in {"mixed": dict(num_2d=6, num_3d=6, seed=0), "2d": dict(num_2d=12, num_3d=0, seed=0),
                    "seg3d": dict(num_2d=0, num_3d=12, seed=1)}.items():  # fmt: skip
        if not os.path.isdir(data[key]):
            generate_synthetic_spad(data[key], **kw)
    mim = {}
    for key in ("mixed", "2d"):
        out = os.path.join(root, f"pretrain_{key}")
        tok = os.path.join(out, "tok", "models", "model.pt")
        if not os.path.isfile(tok):
            _run(["train.json", "demo.json", "train_tokenizer.json", "demo_tokenizer.json"], dataset_dir=data[key],
                 output_dir=os.path.join(out, "tok"), max_steps=args.tokenizer_steps)  # fmt: skip
        mim[key] = os.path.join(out, "mim", "models", "model.pt")
        if not os.path.isfile(mim[key]):
            _run(["train.json", "demo.json"], dataset_dir=data[key], output_dir=os.path.join(out, "mim"),
                 tokenizer_ckpt=tok, max_steps=args.mim_steps)  # fmt: skip
        print(f"pre-trained on {key} ({time.time() - t0:.0f} s)", flush=True)
    arms = {"scratch": "none", "MIM on 2D + 3D": mim["mixed"], "MIM on 2D only": mim["2d"]}
    scores: dict[str, list[float]] = {a: [] for a in arms}
    for seed in args.seeds:
        for arm, ckpt in arms.items():
            out = os.path.join(root, f"seg_{arm.replace(' ', '_').replace('+', 'and')}_seed{seed}")
            _run(["finetune_seg.json", "demo.json", "demo_seg.json"], dataset_dir=data["seg3d"], output_dir=out,
                 pretrained_checkpoint=ckpt, seed=seed, label_fraction=args.label_fraction,
                 max_steps=args.seg_steps, resume=False)  # fmt: skip
            scores[arm].append(_last_val_dice(os.path.join(out, "logs")))
            print(f"seed {seed} {arm}: {scores[arm][-1]:.3f} ({time.time() - t0:.0f} s)", flush=True)
    rows = [
        "| initialisation | val mean Dice, mean [95% CI] | per seed | paired difference to scratch [95% CI] |",
        "|---|---|---|---|",
    ]
    for arm, v in scores.items():
        diff = "" if arm == "scratch" else _ci(np.subtract(v, scores["scratch"]))
        rows.append(f"| {arm} | {_ci(v)} | {', '.join(f'{x:.3f}' for x in v)} | {diff} |")
    cmd = (f"python tools/spad_transfer.py --seeds {' '.join(map(str, args.seeds))} --label-fraction "
           f"{args.label_fraction} --mim-steps {args.mim_steps} --tokenizer-steps {args.tokenizer_steps} "
           f"--seg-steps {args.seg_steps}")  # fmt: skip
    table = "\n".join([f"`{cmd}` ({time.time() - t0:.0f} s on 2 shared CPU cores):", "", *rows])
    print(table)
    if args.write_docs:
        text = DOCS.read_text(encoding="utf-8")
        if START not in text or END not in text:
            raise SystemExit(f"{DOCS} has no {START} ... {END} block.")
        head, rest = text.split(START, 1)
        DOCS.write_text(head + START + "\n" + table + "\n" + END + rest.split(END, 1)[1], encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
