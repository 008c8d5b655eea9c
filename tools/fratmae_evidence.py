"""Measure FratMAE's two pre-training mechanisms at demo scale on generated PET/CT data.

1. Cross-modal reconstruction: the masked-PET reconstruction error (MSE on the masked PET tokens of held-out
   cases, the same masks for every arm) of FratMAE, whose PET decoder cross-attends to the CT tokens, against
   the plain MAE decoder (``mae.json``: per-modality masking, no cross-attention, no text). The paper's premise
   is that the CT context lowers it.
2. ContextAlign: text-to-image retrieval among held-out cases (each case's metadata prompt ranks every
   held-out PET image by cosine similarity of the joint-space embeddings) of FratMAE with ContextAlign against
   FratMAE trained without it (the same network, InfoNCE weight 0, so its text tower is untrained), against
   the exact chance level.

Every arm is the bundle's own pre-training (``train.json`` + ``demo.json`` + the arm's override, parsed with
``monai.bundle.ConfigParser`` and run through its ``SupervisedTrainer``) for the same number of steps, with the
same seeds; arms are paired by seed. The metric, seeds, split and masks are fixed before running:

    python tools/fratmae_evidence.py --work /tmp/fratmae_evidence     # about 15 minutes on 2 CPU cores

Outputs ``<work>/results.json`` (per seed and per case) and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "fratmae_petct" / "configs"
# arm -> (override files merged over train.json + demo.json, overrides)
ARMS = {
    "MAE": (["mae.json"], {}),
    "FratMAE w/o ContextAlign": ([], {"infonce_weight": 0.0}),
    "FratMAE": ([], {}),
}


def paired_ci(diffs: list[float]) -> tuple[float, float, float]:
    """Mean of per-seed paired differences and its two-sided 95% Student-t interval."""
    d = np.asarray(diffs, float)
    if d.size < 2:
        return float(d.mean()), float("nan"), float("nan")
    from scipy import stats

    half = float(stats.t.ppf(0.975, d.size - 1)) * d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def parser_for(arm: str, dataset_dir: Path, out: Path, cache: Path, seed: int, args: argparse.Namespace) -> Any:
    """The bundle's pre-training config for one arm (``train.json`` + ``demo.json`` + the arm's files), run on CPU
    without checkpoints or logs (only the learning-rate schedule handler)."""
    from monai.bundle import ConfigParser

    files, over = ARMS[arm]
    p = ConfigParser()
    p.read_config([str(CONFIGS / f) for f in ["train.json", "demo.json", *files]])
    p.update({
        "dataset_dir": str(dataset_dir), "output_dir": str(out), "cache_dir": str(cache), "seed": seed,
        "epochs": args.epochs, "batch_size": args.batch_size, "num_workers": 0, "resume": False,
        "device": "cpu", "train#handlers": [{"_target_": "LrScheduleHandler", "lr_scheduler": "@train#lr_scheduler",
                                             "print_lr": False, "epoch_level": False}],
        **over,
    })  # fmt: skip
    return p


def eval_inputs(parser: Any, test_dir: Path, num_crops: int) -> dict:
    """Held-out cases through the bundle's deterministic transforms, then ``num_crops`` fixed stack crops."""
    from monai.transforms import Compose

    parser["dataset_dir"] = str(test_dir)
    datalist = parser.get_parsed_content("train#datalist")
    tf = Compose(parser.get_parsed_content("train#deterministic_transforms"))
    crop = parser.get_parsed_content("stack_crop")
    axis, k = crop["stack_axis"], crop["factor"]
    window = crop["roi_size"][axis] * k
    pets, cts, prompts, cases, diags = [], [], [], [], []
    for item in datalist:
        d = tf(item)
        pet, ct = (torch.as_tensor(np.asarray(d[m])) for m in ("pet", "ct"))
        for s in np.linspace(0, pet.shape[1 + axis] - window, num_crops).round().astype(int):
            idx = torch.arange(int(s), int(s) + window, k)  # every k-th slice of the window, as in training
            pets.append(pet.index_select(1 + axis, idx))
            cts.append(ct.index_select(1 + axis, idx))
        prompts.append(d["prompt_ids"])
        cases.append(item["case"])
        diags.append(item["prompt"])
    return {"pet": torch.stack(pets).float(), "ct": torch.stack(cts).float(), "prompt_ids": torch.stack(
        [torch.as_tensor(x) for x in prompts]).long(), "cases": cases, "prompts": diags, "crops": num_crops}


@torch.no_grad()
def evaluate(net: Any, ev: dict, patch_size: Any, mask_ratio: float, mask_seed: int) -> dict:
    """Per-case masked-PET MSE (fixed masks) and, with a text tower, the text/image similarity matrix."""
    from medfm.losses.masked_mse import masked_mse
    from medfm.masking import random_masking
    from medfm.networks.blocks import patchify, token_grid

    net.eval()
    pet, ct, kc = ev["pet"], ev["ct"], ev["crops"]
    n_tok = math.prod(token_grid(pet.shape[2:], patch_size))
    g = torch.Generator().manual_seed(mask_seed)
    mk = random_masking(pet.shape[0], n_tok, mask_ratio, g)
    out = net(pet, ct, masks={"pet": mk, "ct": None}, text_tokens=ev["prompt_ids"].repeat_interleave(kc, 0)
              if net.text_encoder is not None else None)  # fmt: skip
    target = patchify(pet, patch_size)
    per_crop = [float(masked_mse(out["pet_pred"][i : i + 1], target[i : i + 1], mk.mask[i : i + 1])) for i in
                range(pet.shape[0])]  # fmt: skip
    res = {"pet_mse": np.asarray(per_crop).reshape(-1, kc).mean(1).tolist()}
    if "pet_clean" in ev:  # the same masked tokens scored against the noise-free PET
        clean = patchify(ev["pet_clean"], patch_size)
        per_crop = [float(masked_mse(out["pet_pred"][i : i + 1], clean[i : i + 1], mk.mask[i : i + 1])) for i in
                    range(pet.shape[0])]  # fmt: skip
        res["pet_mse_clean"] = np.asarray(per_crop).reshape(-1, kc).mean(1).tolist()
        res["noise_floor"] = float(masked_mse(target, clean, mk.mask))
    if "image_embed" in out:
        cls = net.forward_features(pet, ct)["pet_tokens"][:, 0]  # unmasked PET
        img = torch.nn.functional.normalize(net.image_projection(cls), dim=-1)
        img = torch.nn.functional.normalize(img.reshape(-1, kc, img.shape[-1]).mean(1), dim=-1)  # mean over crops
        txt = torch.nn.functional.normalize(net.text_encoder(ev["prompt_ids"]), dim=-1)
        res["similarity"] = (txt @ img.T).tolist()
    net.train()
    return res


def reference_errors(ev: dict, patch_size: Any, mask_ratio: float, mask_seed: int) -> dict:
    """Masked-PET MSE of two predictors that learn nothing, on the same masks as :func:`evaluate`: all zeros, and
    each stack's mean over its visible PET voxels. A pre-trained decoder must beat them to have learned PET."""
    from medfm.losses.masked_mse import masked_mse
    from medfm.masking import random_masking
    from medfm.networks.blocks import patchify, token_grid

    target = patchify(ev["pet"], patch_size)
    n_tok = math.prod(token_grid(ev["pet"].shape[2:], patch_size))
    mk = random_masking(target.shape[0], n_tok, mask_ratio, torch.Generator().manual_seed(mask_seed))
    vis = (~mk.mask).float()[..., None]
    mean_vis = (target * vis).sum((1, 2), keepdim=True) / (vis.sum(1, keepdim=True) * target.shape[2])
    return {"zero": float(masked_mse(torch.zeros_like(target), target, mk.mask)),
            "visible_mean": float(masked_mse(mean_vis.expand_as(target), target, mk.mask))}  # fmt: skip


def retrieval(sim: np.ndarray, groups: list, k: int) -> tuple[float, float]:
    """Top-k text-to-image retrieval: a query is right when one of its k best images has the query's group.

    Returns ``(accuracy, chance)``; chance is the exact expectation under a uniformly random ranking:
    ``1 - C(N - m, k) / C(N, k)`` averaged over queries, ``m`` the number of images in the query's group.
    """
    n = len(groups)
    g = np.asarray(groups)
    order = np.argsort(-sim, axis=1)[:, :k]
    hits = [(g[order[i]] == g[i]).any() for i in range(n)]
    chance = [1 - math.comb(n - int((g == g[i]).sum()), k) / math.comb(n, k) for i in range(n)]
    return float(np.mean(hits)), float(np.mean(chance))


def run_arm(arm: str, seed: int, args: argparse.Namespace, work: Path, ev: dict) -> dict:
    from ignite.engine import Events

    p = parser_for(arm, work / "data_train", work / "runs" / f"{arm.replace(' ', '_')}_{seed}", work / "cache", seed,
                   args)  # fmt: skip
    p.get_parsed_content("initialize")  # set_determinism(seed)
    trainer = p.get_parsed_content("train#trainer")
    net = p.get_parsed_content("network_def")
    patch, ratio = p.get_parsed_content("patch_size"), p.get_parsed_content("mask_ratio")
    from monai.utils import ensure_tuple_rep

    patch = ensure_tuple_rep(patch, 3)
    curve: dict[str, list] = {"iteration": [], "train_mse": [], "heldout_pet_mse": []}
    window: list[float] = []
    total = args.epochs * len(p.get_parsed_content("train#dataloader"))
    every = max(1, total // args.curve_points)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _log(engine: Any) -> None:
        window.append(engine.state.output["terms"]["mse"])
        if engine.state.iteration % every == 0 or engine.state.iteration == total:
            curve["iteration"].append(engine.state.iteration)
            curve["train_mse"].append(float(np.mean(window)))
            window.clear()
            curve["heldout_pet_mse"].append(float(np.mean(evaluate(net, ev, patch, ratio, args.mask_seed)["pet_mse"])))

    t0 = time.time()
    trainer.run()
    res = evaluate(net, ev, patch, ratio, args.mask_seed)
    res.update(curve=curve, seconds=time.time() - t0, steps=trainer.state.iteration, patch_size=list(patch),
               mask_ratio=ratio)  # fmt: skip
    print(f"  {arm} seed {seed}: {res['steps']} steps, {res['seconds']:.0f} s, held-out masked-PET MSE "
          f"{np.mean(res['pet_mse']):.5f}", file=sys.stderr, flush=True)  # fmt: skip
    return res


def summarise(results: dict, ev: dict, args: argparse.Namespace) -> str:
    seeds = args.seeds
    first = results["MAE"][str(seeds[0])]
    ref = reference_errors(ev, first["patch_size"], first["mask_ratio"], args.mask_seed)
    lines = [f"Held-out cases: {len(ev['cases'])}; seeds {seeds}; {results['MAE'][str(seeds[0])]['steps']} steps "
             f"per arm (batch {args.batch_size}). Reference predictors on the same masks: all zeros "
             f"{ref['zero']:.5f}, each stack's visible-PET mean {ref['visible_mean']:.5f}.", "",
             "| arm | held-out masked-PET MSE per seed | mean |", "|---|---|---|"]  # fmt: skip
    mse = {a: [float(np.mean(results[a][str(s)]["pet_mse"])) for s in seeds] for a in results}
    for a, v in mse.items():
        lines.append(f"| {a} | {', '.join(f'{x:.5f}' for x in v)} | {np.mean(v):.5f} |")
    for a in ("FratMAE w/o ContextAlign", "FratMAE"):
        d, lo, hi = paired_ci([x - y for x, y in zip(mse[a], mse["MAE"])])
        rel = d / np.mean(mse["MAE"])
        lines.append(f"\n{a} minus MAE: {d:+.5f} (95% CI {lo:+.5f} to {hi:+.5f}, paired t over seeds; "
                     f"{100 * rel:+.1f}% of MAE's)")  # fmt: skip
    clean = {a: [float(np.mean(results[a][str(s)]["pet_mse_clean"])) for s in seeds] for a in results}
    floor = results["MAE"][str(seeds[0])]["noise_floor"]
    lines += ["", f"Against the noise-free PET of the same cases (noise floor of the noisy targets: {floor:.5f}):", "",
              "| arm | masked-PET MSE vs noise-free PET, per seed | mean |", "|---|---|---|"]  # fmt: skip
    for a, v in clean.items():
        lines.append(f"| {a} | {', '.join(f'{x:.5f}' for x in v)} | {np.mean(v):.5f} |")
    for a in ("FratMAE w/o ContextAlign", "FratMAE"):
        d, lo, hi = paired_ci([x - y for x, y in zip(clean[a], clean["MAE"])])
        lines.append(f"\n{a} minus MAE (noise-free targets): {d:+.5f} (95% CI {lo:+.5f} to {hi:+.5f}; "
                     f"{100 * d / np.mean(clean['MAE']):+.1f}% of MAE's)")  # fmt: skip
    lines.append("\nLearning curves (held-out masked-PET MSE at evenly spaced steps, seed " + str(seeds[0]) + "):")
    for a in results:
        c = results[a][str(seeds[0])]["curve"]
        pts = zip(c["iteration"], c["train_mse"], c["heldout_pet_mse"])
        pts = ", ".join(f"{i}: {t:.5f}/{h:.5f}" for i, t, h in pts)
        lines.append(f"- {a} (step: train MSE/held-out PET MSE): {pts}")
    from medfm.metrics import bootstrap_ci

    per_case = np.mean([np.subtract(results["FratMAE w/o ContextAlign"][str(s)]["pet_mse"],
                                    results["MAE"][str(s)]["pet_mse"]) for s in seeds], axis=0)  # fmt: skip
    m, lo, hi = bootstrap_ci(per_case, seed=0)
    lines.append(f"Per held-out case (mean over seeds), FratMAE w/o ContextAlign minus MAE: {m:+.5f} (95% bootstrap "
                 f"CI {lo:+.5f} to {hi:+.5f}); lower for {int((per_case < 0).sum())} of {per_case.size} cases.")
    diag = [pr.split("<diagnosis>")[1].split("<age>")[0].strip() for pr in ev["prompts"]]
    lines += ["", "| arm | retrieval | per seed | mean | chance |", "|---|---|---|---|---|"]
    acc: dict = {}
    for a in ("FratMAE w/o ContextAlign", "FratMAE"):
        for name, groups, k in (("same prompt, top-1", ev["prompts"], 1), ("same prompt, top-5", ev["prompts"], 5),
                                ("same diagnosis, top-1", diag, 1)):  # fmt: skip
            vals = [retrieval(np.asarray(results[a][str(s)]["similarity"]), groups, k) for s in seeds]
            acc[(a, name)] = [v[0] for v in vals]
            lines.append(f"| {a} | {name} | {', '.join(f'{v[0]:.2f}' for v in vals)} | {np.mean(acc[(a, name)]):.3f} "
                         f"| {vals[0][1]:.3f} |")  # fmt: skip
    for name in ("same prompt, top-1", "same prompt, top-5", "same diagnosis, top-1"):
        d, lo, hi = paired_ci([x - y for x, y in zip(acc[("FratMAE", name)], acc[("FratMAE w/o ContextAlign", name)])])
        lines.append(f"\nContextAlign gain, {name}: {d:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}, paired t over seeds)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="folder for data, caches, runs and results.json")
    ap.add_argument("--train-cases", type=int, default=40)
    ap.add_argument("--test-cases", type=int, default=20)
    ap.add_argument("--grid", type=int, nargs=3, default=[96, 64, 192])
    ap.add_argument("--spacing", type=float, nargs=3, default=[5.0, 5.0, 10.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=60, help="epochs of --train-cases / --batch-size steps")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crops", type=int, default=4, help="fixed stack crops per held-out case")
    ap.add_argument("--mask-seed", type=int, default=1234, help="seed of the held-out masks (same for every arm)")
    ap.add_argument("--curve-points", type=int, default=6, help="held-out evaluations along each run")
    args = ap.parse_args(argv)
    from medfm.data import generate_synthetic_petct

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    grid = {"shape": tuple(args.grid), "spacing": tuple(args.spacing)}
    t0 = time.time()
    if not (work / "data_train").exists():
        generate_synthetic_petct(str(work / "data_train"), num_cases=args.train_cases, seed=0, **grid)
        generate_synthetic_petct(str(work / "data_test"), num_cases=args.test_cases, seed=1000, **grid)
        generate_synthetic_petct(str(work / "data_test_clean"), num_cases=args.test_cases, seed=1000, noise=False,
                                 **grid)  # fmt: skip
    ev, clean = (eval_inputs(parser_for("FratMAE", work / d, work / "runs" / "eval", work / f"cache_{d}", 0, args),
                             work / d, args.crops) for d in ("data_test", "data_test_clean"))  # fmt: skip
    ev["pet_clean"] = clean["pet"]
    print(f"data ready ({time.time() - t0:.0f} s)", file=sys.stderr)
    results: dict = {a: {} for a in ARMS}
    for seed in args.seeds:
        for arm in ARMS:
            results[arm][str(seed)] = run_arm(arm, seed, args, work, ev)
    (work / "results.json").write_text(json.dumps({"args": vars(args), "cases": ev["cases"], "prompts": ev["prompts"],
                                                   "results": results}, indent=1))  # fmt: skip
    print(summarise(results, ev, args))
    print(f"\ntotal {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
