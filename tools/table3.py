"""Reproduce FratMAE's Table 3 protocol at demo scale and write the table into the bundle docs.

The paper (arXiv:2503.02824, Table 3) pre-trains five ways — (1) no pre-training, (2) MAE, (3) MAE with
ContextAlign, (4) FratMAE without ContextAlign, (5) FratMAE — then fine-tunes lesion segmentation and Ann Arbor
staging on 20% of the labelled training set and reports Dice and IoU (95% bootstrap CI over test cases),
macro sensitivity and accuracy. This command runs the same protocol on generated demo data through the
bundle's own configs and the ``python -m monai.bundle run`` command line:

    python tools/table3.py --work /tmp/table3 --write-docs     # about 35 minutes on 2 CPU cores

Every step's output stays under ``--work``; ``--write-docs`` replaces the table between the markers in
``bundles/fratmae_petct/docs/README.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

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


def run_protocol(args: argparse.Namespace) -> list[dict]:
    from medfm.data import generate_synthetic_petct

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    grid = {"shape": tuple(args.grid), "spacing": tuple(args.spacing)}
    train, test = work / "data_train", work / "data_test"
    if not train.exists():
        generate_synthetic_petct(str(train), num_cases=args.train_cases, seed=args.seed, **grid)
    if not test.exists():
        generate_synthetic_petct(str(test), num_cases=args.test_cases, seed=args.seed + 1000, **grid)
    results = []
    for row in ROWS:
        print(row, file=sys.stderr)
        tag = row.split(")")[0].strip("(")
        out = work / f"row{tag}"
        out.mkdir(exist_ok=True)
        ckpt = "none"  # the Baseline row: fine-tuned from random initialisation
        if row in PRETRAIN:
            bundle_run(["train.json", "demo.json", *PRETRAIN[row]], out / "pretrain.log", dataset_dir=train,
                       output_dir=out / "pretrain", epochs=args.pretrain_epochs, seed=args.seed)  # fmt: skip
            ckpt = out / "pretrain" / "models" / "model.pt"
        common = {"dataset_dir": train, "pretrained_checkpoint": ckpt, "label_fraction": args.label_fraction,
                  "seed": args.seed, "resume": False}  # fmt: skip
        bundle_run(["finetune_seg.json", "demo_seg.json"], out / "seg.log", output_dir=out / "seg",
                   epochs=args.seg_epochs, val_interval=args.seg_epochs, **common)  # fmt: skip
        seg_eval = out / "seg_eval"
        bundle_run(["inference.json", "evaluate.json", "demo_inference.json"], out / "seg_eval.log",
                   dataset_dir=test, ckpt_path=out / "seg" / "models" / "model.pt", output_dir=seg_eval)  # fmt: skip
        bundle_run(["finetune_stage.json", "demo_stage.json"], out / "stage.log", output_dir=out / "stage",
                   epochs=args.stage_epochs, val_interval=args.stage_epochs, **common)  # fmt: skip
        bundle_run(["finetune_stage.json", "demo_stage.json", "evaluate_stage.json"], out / "stage_eval.log",
                   dataset_dir=test, output_dir=out / "stage")  # fmt: skip
        seg = json.loads((seg_eval / "metrics.json").read_text())["summary"]
        stage = json.loads((out / "stage" / "eval" / "metrics.json").read_text())
        results.append({"row": row, "dice": seg["dice"], "iou": seg["iou"],
                        "macro_sensitivity": stage["macro_sensitivity"], "accuracy": stage["accuracy"]})  # fmt: skip
        print(json.dumps(results[-1]))
    return results


def table_markdown(results: list[dict], args: argparse.Namespace) -> str:
    def ci(m: dict) -> str:
        return f"{m['mean']:.3f} ({m['ci_low']:.3f}-{m['ci_high']:.3f})"

    lines = [
        f"Demo scale: {args.train_cases} generated training cases ({args.label_fraction:.0%} of the labelled "
        f"training split used for fine-tuning), {args.test_cases} generated test cases, grid "
        f"{'x'.join(map(str, args.grid))}; pre-training {args.pretrain_epochs} epochs, segmentation "
        f"{args.seg_epochs} epochs, staging {args.stage_epochs} epochs, seed {args.seed}; demo-size model "
        "(demo.json / demo_seg.json / demo_stage.json). CIs: 95%, 1,000-sample bootstrap over test cases.",
        "",
        "| pre-training | Dice (CI) | IoU (CI) | staging macro sensitivity | staging accuracy |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['row']} | {ci(r['dice'])} | {ci(r['iou'])} | {r['macro_sensitivity']:.3f} | {r['accuracy']:.3f} |")
    grid = " ".join(map(str, args.grid))
    spacing = " ".join(f"{x:g}" for x in args.spacing)
    cmd = (f"python tools/table3.py --work <dir> --train-cases {args.train_cases} --test-cases {args.test_cases} "
           f"--grid {grid} --spacing {spacing} "
           f"--pretrain-epochs {args.pretrain_epochs} --seg-epochs {args.seg_epochs} --stage-epochs {args.stage_epochs} "
           f"--label-fraction {args.label_fraction} --seed {args.seed} --write-docs")  # fmt: skip
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
    p.add_argument("--test-cases", type=int, default=10)
    p.add_argument("--grid", type=int, nargs=3, default=[96, 64, 192], help="demo volume size (X Y Z)")
    p.add_argument("--spacing", type=float, nargs=3, default=[5.0, 5.0, 10.0], help="demo voxel size in mm")
    p.add_argument("--pretrain-epochs", type=int, default=30)
    p.add_argument("--seg-epochs", type=int, default=400)
    p.add_argument("--stage-epochs", type=int, default=60)
    p.add_argument("--label-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-docs", action="store_true", help="write the table into the bundle docs")
    args = p.parse_args(argv)
    results = run_protocol(args)
    md = table_markdown(results, args)
    print(md)
    if args.write_docs:
        write_docs(md)


if __name__ == "__main__":
    main()
