#!/usr/bin/env python
"""M-IDoL with and without the routing loss at demo scale: routing purity, expert balance and modality separation.

    python tools/midol_routing.py [--seeds 0 1 2] [--steps 100] [--per-modality 32] [--batch-size 32]
                                  [--variants routing no_routing] [--set ID=JSON ...] [--out-dir DIR] [--write-docs]

For each variant and seed, pre-train on the synthetic five-modality demo (:func:`medfm.data.generate_synthetic_midol`,
``--per-modality`` images per modality, generated once) with ``demo.json``'s model at ``--batch-size``:

- ``routing``: ``train.json`` + ``demo.json`` (the bundle's routing-loss weight);
- ``no_routing``: ``train.json`` + ``demo.json`` + ``no_routing.json`` (``route_weight`` 0);

``--variants`` runs a subset; ``--set ID=VALUE`` (repeatable) overrides a config id in every variant, VALUE read as
JSON when it parses (``--set loss_def#iterations=50 --set loss_def#route_teacher_temp=1.0``), else as a string;

then pass every demo image, as one deterministic view (the bundle's loading and scaling, then
:class:`medfm.transforms.ResizeNormalized` at the demo's global crop size), through the TEACHER and the STUDENT of
the final checkpoint (eval mode: no gate noise): the pooled backbone feature
(:class:`medfm.networks.blocks.SwinBackbone`) and the router logits of the head's MoE gate on that feature. Measured
for each of the two gates:

- routing purity per modality: the share of the modality's images whose top-1 expert (argmax of the router
  logits) is the modality's most used top-1 expert; and its mean over the modalities;
- expert balance: the smallest share of all images that any of the head's experts receives as top-1 (0 when an
  expert is unused; ``1 / E`` when perfectly balanced);
- experts used: the number of distinct experts that are top-1 for at least one image, and the number of distinct
  experts that are the most used expert of some modality (5 when every modality has its own expert);
- modality separation: the silhouette score of the teacher backbone features with the modality labels, with
  COSINE distance (``1 - cos``; scale-free, as the features are compared after L2 normalisation in the head).

Prints a Markdown block (mean and 95% t-interval over seeds) between ``<!-- routing:start -->`` and
``<!-- routing:end -->`` and, with ``--write-docs``, replaces that block in
``bundles/midol_multimodal/docs/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.distance import cdist
from scipy.stats import t as student_t

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "midol_multimodal"
DOCS = BUNDLE / "docs" / "README.md"
START, END = "<!-- routing:start -->", "<!-- routing:end -->"
VARIANTS = {"routing": ["train.json", "demo.json"], "no_routing": ["train.json", "demo.json", "no_routing.json"]}


def _workflow(names: Sequence[str], **override):
    from monai.bundle import ConfigWorkflow

    return ConfigWorkflow(
        config_file=[str(BUNDLE / "configs" / n) for n in names],
        meta_file=str(BUNDLE / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        **override,
    )


def silhouette(x: np.ndarray, labels: Sequence, metric: str = "cosine") -> float:
    """Mean silhouette ``s_i = (b_i - a_i) / max(a_i, b_i)`` of the rows of ``x`` (N, D) under ``labels`` (N,).

    ``a_i``: mean distance from ``i`` to the other members of its cluster; ``b_i``: the smallest mean distance from
    ``i`` to the members of another cluster. A point alone in its cluster has ``s_i = 0`` (Rousseeuw's
    convention, as scikit-learn). ``metric``: any :func:`scipy.spatial.distance.cdist` metric ("cosine":
    ``1 - cos``, "euclidean", ...).

    Raises:
        ValueError: fewer than 2 or more than N - 1 clusters, or ``x`` and ``labels`` of different lengths.
    """
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"need x (N, D) and N labels, got {x.shape} and {labels.shape}.")
    names, y = np.unique(labels, return_inverse=True)
    if not 2 <= len(names) <= len(x) - 1:
        raise ValueError(f"silhouette needs 2 <= clusters <= N - 1, got {len(names)} clusters for N = {len(x)}.")
    d = cdist(x, x, metric=metric)
    np.fill_diagonal(d, 0.0)  # cosine of a row with itself can round to 1e-16
    onehot = np.eye(len(names))[y]  # (N, K)
    sums = d @ onehot  # (N, K): summed distance from i to each cluster
    sizes = onehot.sum(0)
    own = sizes[y] - 1  # other members of i's cluster
    a = np.where(own > 0, sums[np.arange(len(x)), y] / np.maximum(own, 1), 0.0)
    mean_to = sums / sizes
    mean_to[np.arange(len(x)), y] = np.inf
    b = mean_to.min(1)
    denom = np.maximum(a, b)
    s = np.where((own > 0) & (denom > 0), (b - a) / np.where(denom > 0, denom, 1.0), 0.0)
    return float(s.mean())


def routing_purity(top1: np.ndarray, modality: Sequence[str], modalities: Sequence[str]) -> dict:
    """Purity per modality (share of its images routed to its most used top-1 expert), its mean, and the experts
    used (distinct top-1 experts over all images; distinct most-used experts over the modalities)."""
    top1, modality = np.asarray(top1), np.asarray(modality)
    purity, dominant = {}, []
    for m in modalities:
        picks = top1[modality == m]
        if len(picks) == 0:
            continue
        counts = np.bincount(picks)
        dominant.append(int(counts.argmax()))
        purity[m] = float(counts.max() / len(picks))
    return {
        "purity": purity,
        "mean_purity": float(np.mean(list(purity.values()))),
        "experts_used": len(np.unique(top1)),
        "dominant_experts": len(set(dominant)),
    }


def expert_balance(top1: np.ndarray, num_experts: int) -> float:
    """The smallest share of the images that any of ``num_experts`` experts receives as top-1 (0 if one is unused)."""
    top1 = np.asarray(top1)
    if num_experts < 1 or len(top1) == 0 or top1.min() < 0 or top1.max() >= num_experts:
        raise ValueError(f"need top-1 indices in [0, {num_experts}) for at least one image, got {top1[:10]}.")
    return float(np.bincount(top1, minlength=num_experts).min() / len(top1))


def training_balance(curve: Sequence[dict], num_experts: int, last: int = 10) -> dict:
    """Per-step balance of the teacher's routing and of the routing loss's Sinkhorn targets in training, from the
    logged terms (``expert_<e>``, ``target_<e>``, ``target_mass_<e>`` of :class:`medfm.engines.MIDoLPretrainIteration`):
    the smallest expert's share of the batch's global crops by teacher top-1 (``teacher``), by the targets'
    largest entry (``target``) and by the targets' mass (``target_mass``), each averaged over the first and the
    ``last`` steps (``<name>_first``, ``<name>_last``); 1/E when balanced."""
    if not curve:
        raise ValueError("no training steps were logged.")
    out = {}
    for name, prefix in (("teacher", "expert_"), ("target", "target_"), ("target_mass", "target_mass_")):
        mins = [min(t[f"{prefix}{e}"] for e in range(num_experts)) for t in curve]
        out[f"{name}_first"] = float(np.mean(mins[:last]))
        out[f"{name}_last"] = float(np.mean(mins[-last:]))
    return out


def interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided Student-t confidence interval of the mean of ``values`` (over seeds)."""
    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return float(a.mean()), float("nan"), float("nan")
    half = float(student_t.ppf(0.5 + level / 2, len(a) - 1) * a.std(ddof=1) / math.sqrt(len(a)))
    return float(a.mean()), float(a.mean() - half), float(a.mean() + half)


@torch.no_grad()
def _measure(pretrain_ckpt: str, data_dir: str, wf) -> dict:
    """Teacher and student top-1 experts and pooled features of every demo image on one deterministic view."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose

    from medfm.data import MODALITIES, build_image_folder_datalist
    from medfm.transforms import MultiCropd, ResizeNormalized

    net = wf.parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(pretrain_ckpt, map_location="cpu", weights_only=True))
    net = net.cpu().eval()
    pre = wf.parser.get_parsed_content("train#preprocessing")
    steps = list(pre.transforms if isinstance(pre, Compose) else pre)
    crops = [t for t in steps if isinstance(t, MultiCropd)]
    if len(crops) != 1:
        raise RuntimeError(f"expected one MultiCropd in train#preprocessing, found {len(crops)}.")
    crop = crops[0]
    size = int(crop.global_views[0].size)
    keys = list(crop.keys)
    load = steps[: steps.index(crop)]  # the bundle's loading + scaling to [0, 1], before the random views
    view = Compose([*load, ResizeNormalized(keys=keys, size=size)])
    datalist = build_image_folder_datalist(data_dir, MODALITIES, check_images=False)
    branches = {"teacher": net.teacher, "student": net.student}
    feats, top1, mods = [], {b: [] for b in branches}, []
    for batch in DataLoader(Dataset([{**d} for d in datalist], view), batch_size=16):
        x = batch[keys[0]].float()
        for name, branch in branches.items():
            f = branch.backbone(x)
            top1[name].append(branch.head.moe.route(f)[0].argmax(1).numpy())
            if name == "teacher":
                feats.append(f.float().numpy())
        mods += [MODALITIES[int(i)] for i in batch["modality_index"]]
    present = [m for m in MODALITIES if m in mods]
    out: dict = {"view_size": size, "silhouette": silhouette(np.concatenate(feats), mods, metric="cosine")}
    for name in branches:
        picks = np.concatenate(top1[name])
        out[name] = routing_purity(picks, mods, present)
        out[name]["balance"] = expert_balance(picks, int(net.num_experts))
    out["num_experts"] = int(net.num_experts)
    return out


def parse_overrides(items: Sequence[str]) -> dict:
    """``["ID=VALUE", ...]`` -> ``{ID: value}``, VALUE parsed as JSON when it parses, else kept as a string.

    Raises:
        ValueError: an item without ``=`` or with an empty id.
    """
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set takes ID=VALUE, got {item!r}.")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _prepare(data_dir: str, per_modality: int, batch_size: int, overrides: dict | None = None) -> dict:
    """Generate the demo images if missing (``per_modality`` per modality) and read how the configs count training
    length: ``{"max_steps": bool, "iterations_per_epoch": int}``."""
    if not os.path.isdir(data_dir):
        from medfm.data import generate_synthetic_midol

        generate_synthetic_midol(data_dir, per_modality=per_modality, seed=0)
    probe = _workflow(VARIANTS["routing"], dataset_dir=data_dir, batch_size=batch_size, **(overrides or {}))
    if "max_steps" in probe.parser:
        return {"max_steps": True, "iterations_per_epoch": 0}
    key = "train#batch_sampler" if "train#batch_sampler" in probe.parser else "train#dataloader"
    return {"max_steps": False, "iterations_per_epoch": max(1, len(probe.parser.get_parsed_content(key)))}


def _run(
    variant: str, seed: int, steps: int, data_dir: str, out: str, length: dict, batch_size: int,
    overrides: dict | None = None,
) -> dict:
    """Pre-train one variant (config ids in ``overrides`` replaced), then measure its final teacher. Without a
    ``max_steps`` id the run takes the fewest whole epochs that hold ``steps`` iterations; ``steps_done`` records
    the iterations actually run. The result and the logged terms of every step go to ``<out>/result.json``."""
    if length["max_steps"]:
        count = {"max_steps": steps}
    else:
        count = {"epochs": max(1, math.ceil(steps / length["iterations_per_epoch"]))}
    pre = _workflow(VARIANTS[variant], dataset_dir=data_dir, output_dir=f"{out}/pretrain", seed=seed, resume=False,
                    batch_size=batch_size, **count, **(overrides or {}))  # fmt: skip
    pre.initialize()
    from ignite.engine import Events

    trainer, curve = pre.parser.get_parsed_content("train#trainer"), []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: curve.append(dict(e.state.output["terms"])))
    pre.run()
    result = _measure(f"{out}/pretrain/models/model.pt", data_dir, pre)
    result["route_weight"] = float(pre.parser.get_parsed_content("route_weight"))
    result["steps_done"] = int(trainer.state.iteration)
    result["training"] = training_balance(curve, int(result["num_experts"]))
    pre.finalize()
    with open(f"{out}/result.json", "w", encoding="utf-8") as f:  # the run's numbers and its per-step terms
        json.dump({**result, "curve": [{k: float(v) for k, v in t.items()} for t in curve]}, f)
    return result


def _table(results: dict[str, list[dict]]) -> str:
    variants = list(results)
    modalities = list(results[variants[0]][0]["teacher"]["purity"])
    n = len(results[variants[0]])

    def cell(values: list[float], fmt: str = ".3f") -> str:
        mean, lo, hi = interval(values)
        return f"{mean:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if n > 1 else f"{mean:{fmt}}"

    def row(name: str, key, fmt: str = ".3f") -> str:
        return f"| {name} | " + " | ".join(cell([key(r) for r in results[v]], fmt) for v in variants) + " |"

    header = ["| {} | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    weights = ", ".join(f"`{v}` route_weight = {results[v][0]['route_weight']:g}" for v in variants)
    first = results[variants[0]][0]
    done = sorted({r["steps_done"] for v in variants for r in results[v]})
    stat = "mean [95% t-interval] over seeds" if n > 1 else "one seed"
    intro = (
        f"Variants: {weights}. {n} seed(s), {'/'.join(map(str, done))} pre-training steps each at batch "
        f"{first['batch_size']}, {first['num_images']} images; {stat}. Teacher and student of the final checkpoint "
        f"(eval mode) on one resized ({first['view_size']} px) + normalised view of every demo image; "
        f"{first['num_experts']} experts, top-1."
    )
    lines = [intro, "", "Routing summary (purity: mean over modalities of the share of a modality's images sent to "
             "its most used expert; balance: the smallest expert's share of all images, 1/E when balanced):"]
    lines += ["", header[0].format("measure"), header[1]]
    for gate in ("teacher", "student"):
        lines.append(row(f"{gate} purity", lambda r, g=gate: r[g]["mean_purity"]))
        lines.append(row(f"{gate} balance", lambda r, g=gate: r[g]["balance"]))
    lines.append(row("silhouette", lambda r: r["silhouette"]))
    lines += ["", "Teacher routing purity per modality:", "", header[0].format("modality"), header[1]]
    lines += [row(m, lambda r, m=m: r["teacher"]["purity"][m]) for m in modalities]
    lines.append(row("mean", lambda r: r["teacher"]["mean_purity"]))
    lines += ["", "In training (the smallest expert's share of a batch's global crops, mean over the first / last 10 "
              "steps; teacher: top-1 of the teacher's router; target: largest entry of the routing loss's Sinkhorn "
              "target; target mass: its share of the targets' mass; 1/E when balanced):", "",
              header[0].format("training balance"), header[1]]
    for name in ("teacher", "target", "target_mass"):
        for when in ("first", "last"):
            key = f"{name}_{when}"
            lines.append(row(f"{name.replace('_', ' ')}, {when} 10 steps", lambda r, k=key: r["training"][k]))
    lines += ["", "Experts used (of the head's experts):", "", header[0].format("experts"), header[1]]
    for gate in ("teacher", "student"):
        lines.append(row(f"{gate}: top-1 of any image", lambda r, g=gate: r[g]["experts_used"], ".2f"))
        lines.append(row(f"{gate}: most used by a modality", lambda r, g=gate: r[g]["dominant_experts"], ".2f"))
    lines += ["", "Silhouette: modality separation of the teacher backbone features (cosine distance, in [-1, 1])."]
    return "\n".join(lines)


def _datalist(data_dir: str) -> list[dict]:
    from medfm.data import MODALITIES, build_image_folder_datalist

    return build_image_folder_datalist(data_dir, MODALITIES, check_images=False)


def _has_block() -> bool:
    text = DOCS.read_text(encoding="utf-8") if DOCS.is_file() else ""
    return START in text and END in text and text.index(START) < text.index(END)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--steps", type=int, default=100, help="pre-training steps per run (default 100)")
    p.add_argument("--per-modality", type=int, default=32, help="demo images per modality (default 32)")
    p.add_argument("--batch-size", type=int, default=32, help="pre-training batch size (default 32)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                   help="variants to run (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="ID=VALUE",
                   help="override a config id in every variant (VALUE as JSON if it parses); repeatable")
    p.add_argument("--out-dir", default=None, help="run folder (default: a temporary folder)")
    p.add_argument("--write-docs", action="store_true", help="write the block into the bundle's docs/README.md")
    args = p.parse_args(argv)
    overrides = parse_overrides(args.overrides)
    if args.write_docs and not _has_block():  # fail before the runs, not after
        raise SystemExit(f"{DOCS} has no {START} ... {END} block to fill.")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="midol_routing_") as tmp:
        root = args.out_dir or tmp
        data = os.path.join(root, "data")
        length = _prepare(data, args.per_modality, args.batch_size, overrides)
        results = {
            v: [
                _run(v, s, args.steps, data, f"{root}/{v}_seed{s}", length, args.batch_size, overrides)
                for s in args.seeds
            ]
            for v in args.variants
        }
        num_images = len(_datalist(data))
        for r in (r for rs in results.values() for r in rs):
            r.update(batch_size=args.batch_size, num_images=num_images)
    table = _table(results)
    cmd = "python tools/midol_routing.py " + " ".join(argv if argv is not None else sys.argv[1:])
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    block = f"{START}\nMade by `{cmd.strip()}` ({time.perf_counter() - start:.0f} s on {where}).\n\n{table}\n{END}"
    print(block)
    if args.write_docs:
        if not _has_block():
            raise SystemExit(f"{DOCS} has no {START} ... {END} block to fill.")
        text = DOCS.read_text(encoding="utf-8")
        DOCS.write_text(text[: text.index(START)] + block + text[text.index(END) + len(END) :], encoding="utf-8")
        print(f"wrote the routing comparison into {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
