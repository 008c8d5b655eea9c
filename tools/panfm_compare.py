#!/usr/bin/env python
"""Random organ masking vs saliency-guided masking (SGM) for Pan-FM at demo scale.

    python tools/panfm_compare.py [--seeds 0 1 2] [--steps 96] [--subjects 48] [--test-subjects 0]
                                  [--organ-variation V] [--view-shift N] [--modes random sgm | MODE init]
                                  [--out-dir DIR] [--write-docs]

For each masking mode (``random``, ``sgm``) and seed: pre-train ``train.json`` + ``demo.json`` on the synthetic
pan-organ cohort (:func:`medfm.data.generate_synthetic_panfm`, ``--subjects``, seed 0; its dominant organs are
adipose and heart), then measure

- the teacher's token-normalised attention share per organ (:func:`medfm.masking.organ_attention_share`: mean
  attention per token, normalised over the subject's present organs; averaged over the subjects that have the
  organ) and its normalised entropy ``H(a) / log |present|`` per subject (1 = every present organ gets the same
  attention per token; mean over the subjects with at least two organs);
- a linear probe (``finetune.json`` + ``linear_probe.json`` + ``demo_finetune.json``) on the frozen teacher
  encoder, evaluated with the missing-organ protocol (:func:`medfm.metrics.missing_organ_robustness`) on a held-out
  cohort (``--test-subjects``, generator seed 1) or, with ``--test-subjects 0``, on the probe's validation subjects;
  the AUROC drop when a dominant organ is missing is ``AUROC(all organs) - AUROC(without it)``.

``--modes`` picks the pre-training masking modes (``random``, ``sgm``, ``mix``); ``init`` adds the same probe on
the encoder as initialised under the same seed, without pre-training (no attention is measured for it), and a table
of one mode and ``init`` pairs them as ``<mode> − init``.

Two options change the setting (both off by default): ``--organ-variation V`` generates both cohorts with the
between-subject variation of every organ but the dominant ones scaled by ``V`` (``organ_variation`` of the
generator), and ``--view-shift N`` gives the teacher's and the student's pass of each pre-training step their own
view, every organ image rolled by up to ``N`` voxels per axis (``view_variants`` of ``tools/panfm_collapse.py``).

Each number is reported as the mean over seeds with a 95% t-interval (``mean ± t(0.975, n-1) sd / sqrt(n)``), and
SGM - random as the mean of the per-seed differences (same seed: same initialisation, data order and probe split)
with its 95% t-interval. Prints Markdown tables and, with ``--write-docs``, writes them into
``bundles/panfm_panorgan/docs/README.md`` between ``<!-- compare:start -->`` and ``<!-- compare:end -->``.
"""

from __future__ import annotations

import argparse
import functools
import math
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
DOMINANT = ("adipose", "heart")  # the synthetic cohort's dominant organs (medfm.data.synthetic_panfm)


def _workflow(names: Sequence[str], **override):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / n) for n in names],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        **override,
    )


def normalised_entropy(share: np.ndarray, present: np.ndarray) -> np.ndarray:
    """``H(a) / log |present|`` per subject with at least two present organs (share: (B, O), rows sum to 1):
    ``normalised_entropy`` of ``tools/panfm_collapse.py`` with the one-organ subjects left out."""
    h = _collapse_tool().normalised_entropy(torch.as_tensor(share), torch.as_tensor(present, dtype=torch.bool))
    return h.numpy()[present.sum(1) >= 2]


@torch.no_grad()
def _attention(pretrain_ckpt: str, data_dir: str, wf) -> tuple[np.ndarray, float]:
    """Mean token-normalised teacher attention share of each organ over the subjects that have it, and the mean
    normalised entropy of the share over the subjects with two or more organs."""
    from monai.data import DataLoader, Dataset

    from medfm.data import read_subject_table

    net = wf.parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(pretrain_ckpt, map_location="cpu", weights_only=True))
    net.eval()
    organs = list(wf.parser.get_parsed_content("organs"))
    load = wf.parser.get_parsed_content("train#preprocessing")
    total, count, entropies = np.zeros(len(organs)), np.zeros(len(organs)), []
    for batch in DataLoader(Dataset(read_subject_table(data_dir), load), batch_size=8):
        present = batch["present"].bool()
        images = {o: batch["image_" + o].float() for o in organs}
        att = net.forward_teacher(images, present)["organ_attention"].double().numpy()
        total += att.sum(0)
        count += present.numpy().sum(0)
        entropies.append(normalised_entropy(att, present.numpy()))
    return total / np.maximum(count, 1), float(np.concatenate(entropies).mean())


@functools.cache
def _collapse_tool():
    """``tools/panfm_collapse.py`` as a module (tools are not a package), loaded once."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("panfm_collapse", Path(__file__).with_name("panfm_collapse.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(mode: str, seed: int, steps: int, data_dir: str, test_dir: str | None, out: str, view_shift: int = 0) -> dict:
    from monai.data import Dataset

    from medfm.data import read_subject_table
    from medfm.metrics import missing_organ_robustness

    if mode == "init":  # no pre-training: the probe on the encoder's random initialisation (seeded by ``seed``)
        ckpt, share, entropy = "none", None, math.nan
    else:
        pre = _workflow(["train.json", "demo.json"], dataset_dir=data_dir, output_dir=f"{out}/pretrain",
                        masking=mode, seed=seed, max_steps=steps)  # fmt: skip
        pre.initialize()
        if view_shift:  # the parsed network_def is the trainer's network: its passes now see their own views
            _collapse_tool().view_variants(pre.parser.get_parsed_content("network_def"), view_shift, 0.0, seed)
        pre.run()
        ckpt = f"{out}/pretrain/models/model.pt"
        share, entropy = _attention(ckpt, data_dir, pre)
        pre.finalize()
    probe = _workflow(["finetune.json", "linear_probe.json", "demo_finetune.json"], dataset_dir=data_dir,
                      output_dir=f"{out}/probe", pretrained_checkpoint=ckpt, seed=seed)  # fmt: skip
    probe.initialize()
    probe.run()
    net = probe.parser.get_parsed_content("network")
    best = f"{out}/probe/models/model.pt"
    if os.path.isfile(best):
        net.load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
    labels = list(probe.parser.get_parsed_content("label_names"))
    organs = list(probe.parser.get_parsed_content("organs"))
    share = [math.nan] * len(organs) if share is None else share
    if test_dir is None:
        test = probe.parser.get_parsed_content("validate#dataset")
    else:
        load = probe.parser.get_parsed_content("preprocessing")
        test = Dataset(read_subject_table(test_dir, label_names=labels), load)
    rows = missing_organ_robustness(net, test, organs, labels, f"{out}/robustness",
                                    seed=seed)  # fmt: skip
    probe.finalize()
    return {"share": dict(zip(organs, share)), "entropy": entropy, "auroc": {r["condition"]: r["macro"] for r in rows}}


def _dominant_drops(result: dict) -> dict[str, float]:
    auroc = result["auroc"]
    drops = {f"drop without {o}": auroc["all organs"] - auroc[f"without {o}"] for o in DOMINANT}
    drops["drop, mean of the dominant organs"] = float(np.mean(list(drops.values())))
    return drops


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t-interval over seeds (half-width NaN for one value)."""
    from scipy.stats import t

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    if v.size == 1:
        return float(v[0]), math.nan
    return float(v.mean()), float(t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))


def _cell(values: Sequence[float]) -> str:
    mean, half = t_interval(values)
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def _table(results: dict[str, list[dict]]) -> str:
    modes = list(results)
    first = results[modes[0]][0]
    n = len(results[modes[0]])
    if "random" in results and "sgm" in results:
        pair = ("sgm", "random")
    elif "init" in results and len(modes) == 2:  # pre-trained against the random initialisation
        pair = (next(m for m in modes if m != "init"), "init")
    else:
        pair = None
    head = "| " + " | ".join(modes) + (f" | {pair[0]} − {pair[1]} |" if pair else " |")
    rule = "|---|" + "---|" * (len(modes) + bool(pair))

    def row(name: str, get) -> str:
        cells = [_cell([get(r) for r in results[m]]) for m in modes]
        if pair:
            cells.append(_cell([get(a) - get(b) for a, b in zip(results[pair[0]], results[pair[1]])]))
        return f"| {name} | " + " | ".join(cells) + " |"

    claims = ("Claims (the abstract's direction: SGM flatter and more robust to a missing dominant organ):"
              if pair == ("sgm", "random") else "Attention and robustness to a missing dominant organ:")
    lines = [f"Mean ± half-width of the 95% t-interval over {n} seed(s)"
             + ("; the last column pairs the runs by seed." if pair else "."), "", claims, "",
             "| measure " + head, rule,
             row("attention entropy (normalised; 1 = uniform per token)", lambda r: r["entropy"])]  # fmt: skip
    for name in _dominant_drops(first):
        lines.append(row(f"AUROC {name}", lambda r, k=name: _dominant_drops(r)[k]))
    lines += ["", "Teacher's token-normalised attention share per organ (mean over subjects having the organ):", "",
              "| organ " + head, rule]  # fmt: skip
    lines += [row(o, lambda r, o=o: r["share"][o]) for o in first["share"]]
    lines += ["", "Linear-probe macro AUROC by test-time condition:", "", "| condition " + head, rule]
    lines += [row(c, lambda r, c=c: r["auroc"].get(c, math.nan)) for c in first["auroc"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, default=96, help="pre-training steps per run (default 96)")
    p.add_argument("--subjects", type=int, default=48, help="pre-training and probe cohort size (default 48)")
    p.add_argument("--test-subjects", type=int, default=0,
                   help="held-out test cohort size (generator seed 1); 0 tests on the probe's validation split")
    p.add_argument("--organ-variation", type=float, default=1.0,
                   help="factor on the between-subject variation of the non-dominant organs (default 1)")
    p.add_argument("--view-shift", type=int, default=0, help="per-view roll of every image in pre-training (default 0)")
    p.add_argument("--modes", nargs="+", default=["random", "sgm"], choices=["random", "sgm", "mix", "init"],
                   help="masking modes to pre-train with (default random sgm); init: no pre-training, the probe on "
                   "the random initialisation")
    p.add_argument("--out-dir", default=None, help="run folder (default: a temporary folder)")
    p.add_argument("--write-docs", action="store_true", help=f"write the tables into {DOCS.relative_to(REPO)}")
    args = p.parse_args(argv)
    from medfm.data import generate_synthetic_panfm
    from medfm.data.panfm import ORGANS

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="panfm_compare_") as tmp:
        root = args.out_dir or tmp
        data, test = os.path.join(root, "data"), None
        variation = {o: args.organ_variation for o in ORGANS if o not in DOMINANT}
        if not os.path.isdir(data):
            generate_synthetic_panfm(data, num_subjects=args.subjects, seed=0, organ_variation=variation)
        if args.test_subjects:
            test = os.path.join(root, "test")
            if not os.path.isdir(test):
                generate_synthetic_panfm(test, num_subjects=args.test_subjects, seed=1, organ_variation=variation)
        results = {m: [_run(m, s, args.steps, data, test, f"{root}/{m}_seed{s}", args.view_shift) for s in args.seeds]
                   for m in args.modes}  # fmt: skip
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
