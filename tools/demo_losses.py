"""Short demo runs of every bundle with fixed seeds, recording each iteration's losses, to check that a change to
the code or the configs leaves training behaviour unchanged.

    python tools/demo_losses.py --out before.json             # on the old code
    python tools/demo_losses.py --out after.json --compare before.json

Each run merges the bundle's configs in the order its docs give, in this process (``ConfigWorkflow``), on the demo
data generated once into ``--data`` (default: a temporary folder), for a few iterations (``--iterations``).
Fine-tuning runs start from the short pre-training run's checkpoint. ``--compare`` exits 1 when any loss differs
from the reference by more than ``--rtol`` (relative) / ``--atol``, or when the two files hold different runs or
different numbers of iterations.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (bundle, run name, config files, the earlier run whose checkpoint it starts from, length key)
RUNS: list[tuple[str, str, list[str], str | None, str]] = [
    ("fratmae_petct", "pretrain", ["train.json", "demo.json"], None, "epochs"),
    ("fratmae_petct", "mae", ["train.json", "demo.json", "mae.json"], None, "epochs"),
    ("fratmae_petct", "axial", ["train.json", "demo.json", "axial.json"], None, "epochs"),
    ("fratmae_petct", "finetune_seg", ["finetune_seg.json", "demo_seg.json"], "pretrain", "epochs"),
    ("fratmae_petct", "finetune_stage",
     ["finetune_seg.json", "finetune_stage.json", "demo_seg.json", "demo_stage.json"], "pretrain", "epochs"),
    ("spad_vit", "tokenizer", ["train.json", "demo.json", "train_tokenizer.json", "demo_tokenizer.json"], None,
     "max_steps"),
    ("spad_vit", "pretrain", ["train.json", "demo.json"], "tokenizer", "max_steps"),
    ("spad_vit", "finetune_seg", ["finetune_seg.json", "demo.json", "demo_seg.json"], "pretrain", "max_steps"),
    ("spad_vit", "finetune_cls", ["finetune_seg.json", "finetune_cls.json", "demo.json", "demo_cls.json"], "pretrain",
     "max_steps"),
    ("panfm_panorgan", "pretrain", ["train.json", "demo.json"], None, "max_steps"),
    ("panfm_panorgan", "sgm", ["train.json", "demo.json", "masking_sgm.json"], None, "max_steps"),
    ("panfm_panorgan", "finetune", ["finetune.json", "demo_finetune.json"], "pretrain", "max_steps"),
    ("panfm_panorgan", "linear_probe", ["finetune.json", "linear_probe.json", "demo_finetune.json"], "pretrain",
     "max_steps"),
    ("midol_multimodal", "pretrain", ["train.json", "demo.json"], None, "epochs"),
    ("midol_multimodal", "no_routing", ["train.json", "demo.json", "no_routing.json"], None, "epochs"),
    ("midol_multimodal", "linear_probe",
     ["finetune_seg.json", "finetune_cls.json", "linear_probe_cls.json", "demo_seg.json", "demo_cls.json"], "pretrain",
     "epochs"),
    ("midol_multimodal", "finetune_cls", ["finetune_seg.json", "finetune_cls.json", "demo_seg.json", "demo_cls.json"],
     "pretrain", "epochs"),
    ("midol_multimodal", "finetune_seg", ["finetune_seg.json", "demo_seg.json"], "pretrain", "epochs"),
]


def _scalars(output) -> dict[str, float]:
    """The loss-like scalars of one iteration's output (a dict, or MONAI's list of per-item dicts)."""
    item = output[0] if isinstance(output, (list, tuple)) and output else output
    out = {}
    if isinstance(item, dict):
        for key, value in item.items():
            if "loss" in str(key).lower():
                try:
                    out[str(key)] = float(value.detach().float().mean()) if hasattr(value, "detach") else float(value)
                except (TypeError, ValueError):
                    continue
    return out


def run_one(bundle: str, names: list[str], data: str, out: str, length_key: str, iterations: int,
            pretrained: str | None) -> list[dict[str, float]]:  # fmt: skip
    from ignite.engine import Events
    from monai.bundle import ConfigWorkflow

    cfg = os.path.join(REPO, "bundles", bundle, "configs")
    override = {"dataset_dir": data, "output_dir": out, length_key: iterations if length_key == "max_steps" else 1}
    if pretrained:  # the pre-trained model a run starts from; SPAD-ViT's pre-training starts from the tokenizer
        override["tokenizer_ckpt" if "train.json" in names else "pretrained_checkpoint"] = pretrained
    here = os.getcwd()
    os.chdir(out)
    losses: list[dict[str, float]] = []
    try:
        wf = ConfigWorkflow(config_file=[os.path.join(cfg, n) for n in names],
                            meta_file=os.path.join(cfg, "metadata.json"), logging_file=False, run_id="training",
                            **override)  # fmt: skip
        wf.initialize()
        trainer = wf.parser.get_parsed_content("train#trainer")

        def record(engine):
            losses.append(_scalars(engine.state.output))
            if len(losses) >= iterations:
                engine.terminate()

        trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
        wf.run()
        wf.finalize()
    finally:
        os.chdir(here)
        gc.collect()
    if not losses or not any(losses):
        raise RuntimeError(f"{bundle} {names}: no loss recorded")
    return losses


def compare(now: dict, ref: dict, rtol: float, atol: float) -> list[str]:
    problems = []
    if sorted(now) != sorted(ref):
        problems.append(f"different runs: {sorted(now)} vs {sorted(ref)}")
    for key in sorted(set(now) & set(ref)):
        a, b = now[key], ref[key]
        if len(a) != len(b):
            problems.append(f"{key}: {len(a)} iterations vs {len(b)}")
            continue
        for i, (x, y) in enumerate(zip(a, b)):
            if sorted(x) != sorted(y):
                problems.append(f"{key} iteration {i}: loss names {sorted(x)} vs {sorted(y)}")
                continue
            for name in x:
                if not math.isclose(x[name], y[name], rel_tol=rtol, abs_tol=atol):
                    problems.append(f"{key} iteration {i} {name}: {x[name]:.8g} vs reference {y[name]:.8g}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file for the recorded losses")
    parser.add_argument("--compare", help="reference JSON written by an earlier run of this tool")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--data", help="folder for the demo data (default: a temporary folder)")
    parser.add_argument("--only", nargs="*", help="bundle names to run (default: all)")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--atol", type=float, default=1e-6)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    results: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data or os.path.join(tmp, "data")
        for bundle, name, names, parent, length_key in RUNS:
            if args.only and bundle not in args.only:
                continue
            out = os.path.join(tmp, bundle, name)
            os.makedirs(out, exist_ok=True)
            pretrained = os.path.join(tmp, bundle, parent, "models", "model.pt") if parent else None
            data = os.path.join(data_root, bundle)
            results[f"{bundle}/{name}"] = run_one(bundle, names, data, out, length_key, args.iterations, pretrained)
            print(f"{bundle}/{name}: {results[f'{bundle}/{name}']}", flush=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    if args.compare:
        with open(args.compare, encoding="utf-8") as f:
            problems = compare(results, json.load(f), args.rtol, args.atol)
        for p in problems:
            print("DIFFERS:", p)
        print("same losses as the reference" if not problems else f"{len(problems)} differences")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
