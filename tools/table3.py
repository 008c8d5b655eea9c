"""Reproduce FratMAE's Table 3 protocol at demo scale and write the table into the bundle docs.

The paper (arXiv:2503.02824, Table 3) pre-trains five ways — (1) no pre-training, (2) MAE, (3) MAE with
ContextAlign, (4) FratMAE without ContextAlign, (5) FratMAE — then fine-tunes lesion segmentation and Ann Arbor
staging on 20% of the labelled training set and reports Dice and IoU (95% bootstrap CI over test cases),
macro sensitivity and accuracy. This command runs the same protocol on generated demo data through the
bundle's own configs and the ``python -m monai.bundle run`` command line:

    python tools/table3.py --work /tmp/table3 --write-docs     # 5 rows x 3 seeds: hours on 2 CPU cores

Seeds (``--seeds``, default 0 1 2) vary pre-training, the label subset and fine-tuning on one generated cohort;
Dice is averaged over the seeds per test case and reported with a bootstrap CI over the test cases, and every
row is compared with the Baseline paired by case. ``--rows`` runs a subset of the rows.

Every step's output stays under ``--work``; ``--write-docs`` replaces the table between the markers in
``bundles/fratmae_petct/docs/README.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "fratmae_petct" / "configs"
DOCS = REPO / "bundles" / "fratmae_petct" / "docs" / "README.md"
START, END = "<!-- table3:start -->", "<!-- table3:end -->"

# the paper's rows, in order; the Baseline row is fine-tuned from scratch
ROWS = ["(1) Baseline", "(2) MAE", "(3) MAE w/ ContextAlign", "(4) FratMAE w/o ContextAlign", "(5) FratMAE"]
# pre-training override files merged over train.json + demo.json for each pre-trained row
PRETRAIN = {"(2) MAE": ["mae.json"], "(3) MAE w/ ContextAlign": ["mae_contextalign.json"],
            "(4) FratMAE w/o ContextAlign": ["fratmae_no_contextalign.json"], "(5) FratMAE": []}  # fmt: skip


def _files(*names: str) -> str:
    return "[" + ",".join(f"'{CONFIGS / n}'" for n in names) + "]"


def bundle_run(config_names: list[str], log: Path, **override: object) -> None:
    """``python -m monai.bundle run`` with the given configs and overrides; stops with the log's tail on failure."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", _files(*config_names)]
    for k, v in override.items():
        cmd += [f"--{k}", str(v)]
    t0 = time.time()
    with open(log, "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(log.parent))
    print(f"  {' '.join(config_names)} ({time.time() - t0:.0f} s) -> {log}", file=sys.stderr)
    if res.returncode != 0:
        raise SystemExit(f"step failed ({res.returncode}); last lines of {log}:\n" + log.read_text()[-3000:])


ROW_KEYS = {"baseline": ROWS[0], "mae": ROWS[1], "mae_contextalign": ROWS[2], "fratmae_no_contextalign": ROWS[3],
            "fratmae": ROWS[4]}  # fmt: skip


# the settings a result depends on: stored with every result so that a table summarised from files states them
PROTOCOL_ARGS = ("train_cases", "test_cases", "grid", "spacing", "pretrain_epochs", "seg_epochs", "stage_epochs",
                 "seg_patch", "seg_slices", "label_fraction", "data_seed", "rows")  # fmt: skip


def run_seed(args: argparse.Namespace, seed: int, rows: list[str], train: Path, test: Path) -> list[dict]:
    """Every row for one seed (pre-training, label subset and fine-tuning seeded alike); per-case Dice kept."""
    work = Path(args.work).resolve() / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for row in rows:
        print(f"seed {seed}: {row}", file=sys.stderr)
        tag = row.split(")")[0].strip("(")
        out = work / f"row{tag}"
        out.mkdir(exist_ok=True)
        ckpt = "none"  # the Baseline row: fine-tuned from random initialisation
        if row in PRETRAIN:
            bundle_run(["train.json", "demo.json", *PRETRAIN[row]], out / "pretrain.log", dataset_dir=train,
                       output_dir=out / "pretrain", epochs=args.pretrain_epochs, seed=seed, resume=False)  # fmt: skip
            ckpt = out / "pretrain" / "models" / "model.pt"
        common = {"dataset_dir": train, "pretrained_checkpoint": ckpt, "label_fraction": args.label_fraction,
                  "seed": seed, "resume": False}  # fmt: skip
        patch = {"patch_extent": list(args.seg_patch), "stack_slices": args.seg_slices}  # coronal stacks
        bundle_run(["finetune_seg.json", "demo_seg.json"], out / "seg.log", output_dir=out / "seg",
                   epochs=args.seg_epochs, val_interval=args.seg_epochs, **common, **patch)  # fmt: skip
        seg_eval = out / "seg_eval"
        bundle_run(["inference.json", "evaluate.json", "demo_inference.json"], out / "seg_eval.log",
                   dataset_dir=test, ckpt_path=out / "seg" / "models" / "model.pt", output_dir=seg_eval,
                   **patch)  # fmt: skip
        with open(seg_eval / "metrics.csv", newline="") as f:
            cases = {r["case"]: float(r["dice"]) for r in csv.DictReader(f) if r["positive"] == "1"}
        result = {"row": row, "seed": seed, "case_dice": cases, "dice": float(np.mean(list(cases.values())))}
        if args.stage_epochs > 0:
            stage_files = ["finetune_seg.json", "finetune_stage.json", "demo_seg.json", "demo_stage.json"]
            bundle_run(stage_files, out / "stage.log", output_dir=out / "stage",
                       epochs=args.stage_epochs, val_interval=args.stage_epochs, **common)  # fmt: skip
            bundle_run([*stage_files, "evaluate_stage.json"], out / "stage_eval.log",
                       dataset_dir=test, output_dir=out / "stage")  # fmt: skip
            stage = json.loads((out / "stage" / "eval" / "metrics.json").read_text())
            result.update(macro_sensitivity=stage["macro_sensitivity"], accuracy=stage["accuracy"])
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "case_dice"}), file=sys.stderr)
    return results


def run_protocol(args: argparse.Namespace) -> list[dict]:
    from medfm.data import generate_synthetic_petct

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    grid = {"shape": tuple(args.grid), "spacing": tuple(args.spacing)}
    train, test = work / "data_train", work / "data_test"
    if not train.exists():  # one generated cohort for every seed: the seeds vary training, not the data
        generate_synthetic_petct(str(train), num_cases=args.train_cases, seed=args.data_seed, **grid)
    if not test.exists():
        generate_synthetic_petct(str(test), num_cases=args.test_cases, seed=args.data_seed + 1000, **grid)
    rows = [ROW_KEYS[k] for k in args.rows]
    protocol = {k: getattr(args, k) for k in PROTOCOL_ARGS}
    results = []
    for seed in args.seeds:
        results += [{**r, "protocol": protocol} for r in run_seed(args, seed, rows, train, test)]
        (work / "results.json").write_text(json.dumps(results, indent=1))
    return results


def summarise(results: list[dict], num_bootstrap: int = 1000) -> list[dict]:
    """Per row: Dice averaged over seeds per test case, mean with a bootstrap CI over the test cases; the paired
    difference to the Baseline row (same cases, same seeds) with its CI; per-seed means."""
    from medfm.metrics import bootstrap_ci

    by_row: dict[str, list[dict]] = {}
    for r in results:
        by_row.setdefault(r["row"], []).append(r)
    cases = sorted(set.intersection(*(set(r["case_dice"]) for r in results)))
    per_case = {row: np.array([np.mean([r["case_dice"][c] for r in rs]) for c in cases]) for row, rs in by_row.items()}
    base = per_case.get(ROWS[0])
    out = []
    for row, rs in by_row.items():
        mean, low, high = bootstrap_ci(per_case[row].tolist(), num_bootstrap, 0.95, 0)
        entry = {"row": row, "seeds": [r["seed"] for r in rs], "num_cases": len(cases),
                 "dice": {"mean": mean, "ci_low": low, "ci_high": high},
                 "seed_means": [r["dice"] for r in rs]}  # fmt: skip
        if base is not None and row != ROWS[0]:
            d, dl, dh = bootstrap_ci((per_case[row] - base).tolist(), num_bootstrap, 0.95, 0)
            entry["diff_vs_baseline"] = {"mean": d, "ci_low": dl, "ci_high": dh}
        if all("accuracy" in r for r in rs):
            entry["macro_sensitivity"] = float(np.mean([r["macro_sensitivity"] for r in rs]))
            entry["accuracy"] = float(np.mean([r["accuracy"] for r in rs]))
        out.append(entry)
    return out


def table_markdown(summary: list[dict], args: argparse.Namespace) -> str:
    def ci(m: dict) -> str:
        return f"{m['mean']:.3f} ({m['ci_low']:.3f} to {m['ci_high']:.3f})"

    stage = all("accuracy" in e for e in summary)
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        f"Demo scale: {args.train_cases} generated training cases ({args.label_fraction:.0%} of the labelled "
        f"training split used for fine-tuning), {args.test_cases} generated test cases ({summary[0]['num_cases']} "
        f"with lesions, the cases Dice is defined on), grid {'x'.join(map(str, args.grid))}; pre-training "
        f"{args.pretrain_epochs} epochs, segmentation {args.seg_epochs} epochs on coronal stacks of "
        f"{'x'.join(map(str, args.seg_patch))} voxels with {args.seg_slices} slices"
        + (f", staging {args.stage_epochs} epochs" if stage else "")
        + f"; seeds {seeds} (pre-training, label subset and fine-tuning); demo-size model (demo.json / "
        "demo_seg.json / demo_stage.json). Dice: per test case averaged over the seeds, mean with a 95% CI from "
        "1,000 bootstrap samples over the test cases; the difference to the Baseline is paired by case.",
        "",
        "| pre-training | Dice (95% CI) | Dice - Baseline (95% CI) | per-seed mean Dice |"
        + (" staging macro sensitivity | staging accuracy |" if stage else ""),
        "|---|---|---|---|" + ("---|---|" if stage else ""),
    ]
    for e in summary:
        diff = ci(e["diff_vs_baseline"]) if "diff_vs_baseline" in e else "—"
        seeds_col = ", ".join(f"{v:.3f}" for v in e["seed_means"])
        extra = f" {e['macro_sensitivity']:.3f} | {e['accuracy']:.3f} |" if stage else ""
        lines.append(f"| {e['row']} | {ci(e['dice'])} | {diff} | {seeds_col} |{extra}")
    grid = " ".join(map(str, args.grid))
    spacing = " ".join(f"{x:g}" for x in args.spacing)
    cmd = (f"python tools/table3.py --work <dir> --train-cases {args.train_cases} --test-cases {args.test_cases} "
           f"--grid {grid} --spacing {spacing} --pretrain-epochs {args.pretrain_epochs} --seg-epochs "
           f"{args.seg_epochs} --stage-epochs {args.stage_epochs} --seg-patch {' '.join(map(str, args.seg_patch))} "
           f"--seg-slices {args.seg_slices} --label-fraction {args.label_fraction} "
           f"--seeds {' '.join(map(str, args.seeds))} --rows {' '.join(args.rows)} --write-docs")  # fmt: skip
    lines += ["", f"Reproduce: `{cmd}`"]
    return "\n".join(lines)


def write_docs(markdown: str) -> None:
    text = DOCS.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{DOCS} has no {START} ... {END} markers to replace.")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{START}\n{markdown}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder for data, runs and logs")
    p.add_argument("--train-cases", type=int, default=30)
    p.add_argument("--test-cases", type=int, default=20)
    p.add_argument("--grid", type=int, nargs=3, default=[96, 64, 192], help="demo volume size (X Y Z)")
    p.add_argument("--spacing", type=float, nargs=3, default=[5.0, 5.0, 10.0], help="demo voxel size in mm")
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--seg-epochs", type=int, default=400,
                   help="segmentation epochs (default 400: at demo size the Baseline leaves the all-background plateau "
                        "only after about 200)")  # fmt: skip
    p.add_argument("--stage-epochs", type=int, default=60, help="0 skips the staging task")
    p.add_argument("--seg-patch", type=int, nargs=3, default=[32, 32, 64],
                   help="segmentation patch extent X Y Z at native resolution (default 32 32 64)")  # fmt: skip
    p.add_argument("--seg-slices", type=int, default=8, help="coronal slices per segmentation patch (default 8)")
    p.add_argument("--label-fraction", type=float, default=0.2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the generated cohort")
    p.add_argument("--rows", nargs="+", choices=list(ROW_KEYS), default=list(ROW_KEYS), help="rows of Table 3")
    p.add_argument("--write-docs", action="store_true", help="write the table into the bundle docs")
    p.add_argument("--results", nargs="+", default=None,
                   help="summarise these results.json files (e.g. of seeds run in parallel), not run")  # fmt: skip
    args = p.parse_args(argv)
    if args.results:
        results = [r for path in args.results for r in json.loads(Path(path).read_text())]
        protocols = {json.dumps(r["protocol"], sort_keys=True) for r in results}
        if len(protocols) != 1:
            raise SystemExit(f"the results were run with different settings: {sorted(protocols)}")
        vars(args).update(results[0]["protocol"])
        args.seeds = sorted({r["seed"] for r in results})
    else:
        results = run_protocol(args)
    summary = summarise(results)
    (Path(args.work).resolve() / "summary.json").write_text(json.dumps(summary, indent=1))
    md = table_markdown(summary, args)
    print(md)
    if args.write_docs:
        write_docs(md)


if __name__ == "__main__":
    main()
