#!/usr/bin/env python
"""Random organ masking vs saliency-guided masking (SGM) for Pan-FM at demo scale.

    python tools/panfm_compare.py [--seeds 0 1 2] [--steps 96] [--out-dir DIR] [--write-docs]

For each masking mode (``random``, ``sgm``) and seed: pre-train ``train.json`` + ``demo.json`` on the synthetic
pan-organ demo (:func:`medfm.data.generate_synthetic_panfm`), then measure

- the teacher's attention share per organ (last-block CLS attention summed per organ, averaged over the
  subjects that have the organ) on every demo subject;
- a linear probe (``finetune.json`` + ``linear_probe.json`` + ``demo_finetune.json``) on the frozen teacher
  encoder, evaluated with the missing-organ protocol (:func:`medfm.metrics.missing_organ_robustness`) on the
  probe's validation subjects.

Prints a Markdown table (means over seeds) and, with ``--write-docs``, writes it into
``bundles/panfm_panorgan/docs/README.md`` between ``<!-- compare:start -->`` and ``<!-- compare:end -->``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "panfm_panorgan"
DOCS = BUNDLE / "docs" / "README.md"
START, END = "<!-- compare:start -->", "<!-- compare:end -->"


def _workflow(names: Sequence[str], **override):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / n) for n in names],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        **override,
    )


@torch.no_grad()
def _attention_share(pretrain_ckpt: str, data_dir: str, wf) -> np.ndarray:
    """Mean teacher attention share of each organ over the subjects that have it."""
    from monai.data import DataLoader, Dataset

    from medfm.data import read_subject_table

    net = wf.parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(pretrain_ckpt, map_location="cpu", weights_only=True))
    net.eval()
    organs = list(wf.parser.get_parsed_content("organs"))
    load = wf.parser.get_parsed_content("train#preprocessing")
    total, count = np.zeros(len(organs)), np.zeros(len(organs))
    for batch in DataLoader(Dataset(read_subject_table(data_dir), load), batch_size=8):
        present = batch["present"].bool()
        images = {o: batch["image_" + o].float() for o in organs}
        att = net.forward_teacher(images, present)["organ_attention"].numpy()
        total += att.sum(0)
        count += present.numpy().sum(0)
    return total / np.maximum(count, 1)


def _run(mode: str, seed: int, steps: int, data_dir: str, out: str) -> dict:
    from medfm.metrics import missing_organ_robustness

    pre = _workflow(["train.json", "demo.json"], dataset_dir=data_dir, output_dir=f"{out}/pretrain", masking=mode,
                    seed=seed, max_steps=steps)  # fmt: skip
    pre.initialize()
    pre.run()
    ckpt = f"{out}/pretrain/models/model.pt"
    share = _attention_share(ckpt, data_dir, pre)
    organs = list(pre.parser.get_parsed_content("organs"))
    pre.finalize()
    probe = _workflow(["finetune.json", "linear_probe.json", "demo_finetune.json"], dataset_dir=data_dir,
                      output_dir=f"{out}/probe", pretrained_checkpoint=ckpt, seed=seed)  # fmt: skip
    probe.initialize()
    probe.run()
    net = probe.parser.get_parsed_content("network")
    best = f"{out}/probe/models/model.pt"
    if os.path.isfile(best):
        net.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
    val = probe.parser.get_parsed_content("validate#dataset")
    labels = list(probe.parser.get_parsed_content("label_names"))
    rows = missing_organ_robustness(net, [val[i] for i in range(len(val))], organs, labels, f"{out}/robustness",
                                    seed=seed)  # fmt: skip
    probe.finalize()
    return {"share": dict(zip(organs, share)), "auroc": {r["condition"]: r["macro"] for r in rows}}


def _table(results: dict[str, list[dict]]) -> str:
    modes = list(results)
    organs = list(results[modes[0]][0]["share"])
    conds = list(results[modes[0]][0]["auroc"])
    n = len(results[modes[0]])

    def cell(values: list[float]) -> str:
        a = np.array(values, dtype=float)
        return f"{np.nanmean(a):.3f} ± {np.nanstd(a):.3f}" if n > 1 else f"{a[0]:.3f}"

    lines = [f"Teacher attention share per organ (mean over subjects having the organ; {n} seed(s), mean ± sd):", "",
             "| organ | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]  # fmt: skip
    for o in organs:
        lines.append(f"| {o} | " + " | ".join(cell([r["share"][o] for r in results[m]]) for m in modes) + " |")
    lines += ["", "Linear-probe macro AUROC on the validation subjects, by test-time condition:", "",
              "| condition | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]  # fmt: skip
    for c in conds:
        lines.append(f"| {c} | " + " | ".join(cell([r["auroc"].get(c, np.nan) for r in results[m]]) for m in modes) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, default=96, help="pre-training steps per run (default 96)")
    p.add_argument("--modes", nargs="+", default=["random", "sgm"], choices=["random", "sgm", "mix"])
    p.add_argument("--out-dir", default=None, help="run folder (default: a temporary folder)")
    p.add_argument("--write-docs", action="store_true", help=f"write the tables into {DOCS.relative_to(REPO)}")
    args = p.parse_args(argv)
    from medfm.data import generate_synthetic_panfm

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="panfm_compare_") as tmp:
        root = args.out_dir or tmp
        data = os.path.join(root, "data")
        if not os.path.isdir(data):
            generate_synthetic_panfm(data, seed=0)
        results = {m: [_run(m, s, args.steps, data, f"{root}/{m}_seed{s}") for s in args.seeds] for m in args.modes}
    table = _table(results)
    cmd = "python tools/panfm_compare.py " + " ".join(argv if argv is not None else sys.argv[1:])
    block = f"{START}\nMade by `{cmd.strip()}` ({time.perf_counter() - start:.0f} s on 2 CPU cores).\n\n{table}\n{END}"
    print(block)
    if args.write_docs:
        text = DOCS.read_text(encoding="utf-8")
        if START not in text or END not in text:
            raise SystemExit(f"{DOCS} has no {START} ... {END} block to fill.")
        DOCS.write_text(text[: text.index(START)] + block + text[text.index(END) + len(END) :], encoding="utf-8")
        print(f"wrote the comparison into {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
