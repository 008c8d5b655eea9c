"""Every bundle's multi-GPU configs under ``torchrun`` with 2 processes on CPU (gloo), in one launch that runs every
bundle's configs of both distributed mechanisms one after another (``helpers.torchrun_jobs``).

- Pre-training (``train.json`` + ``demo.json`` + ``multi_gpu_train.json``): DistributedDataParallel, each rank's
  share of the batches (the bundle's own sampler split by rank), rank 0 alone logging and writing checkpoints, the
  weights saved without DDP's ``module.`` prefix.
- Fine-tuning (``multi_gpu_finetune.json``, and MONAI Label's multi-GPU ``/train`` of a served bundle): the above,
  plus validation on every rank (ignite's metrics all-reduce: a rank that skipped validation would leave the other
  waiting, and the launch would not end) while rank 0 alone logs and writes the best model.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from monai.bundle import ConfigParser

from medfm.data import (
    export_petct_studies,
    generate_synthetic_petct,
    studies_datalist,
)
from medfm.utils import build_served_bundle

from ..tools.test_serve_bundle import _demo_weights, _replaced, _served_and_epoch_scores
from .helpers import REPO, configs, save_untrained, torchrun_jobs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory, demo_data):
    """Each bundle's demo data; untrained demo-size weights where a run needs a checkpoint to load."""
    root = tmp_path_factory.mktemp("ddp_data")
    d = {b: demo_data(b) for b in ("fratmae_petct", "spad_vit", "panfm_panorgan", "midol_multimodal")}
    d["fratmae_finetune"] = str(root / "petct_ft")
    generate_synthetic_petct(d["fratmae_finetune"], num_cases=6, shape=(48, 32, 96), spacing=(10.0, 10.0, 20.0),
                             seed=3)  # fmt: skip
    # the frozen tokenizer and FratMAE's pre-training only have to load: untrained weights of the demo size
    d["tokenizer"] = save_untrained("spad_vit", ["train.json", "demo.json"], "tokenizer_def", root / "tokenizer.pt",
                                    dataset_dir=d["spad_vit"], output_dir=str(root / "unused"))  # fmt: skip
    d["fratmae_pre"] = save_untrained("fratmae_petct", ["train.json", "demo.json"], "network_def", root / "pre.pt",
                                      dataset_dir=d["fratmae_petct"], output_dir=str(root / "unused"))  # fmt: skip
    return d


# --- pre-training: every bundle ---


@pytest.fixture(scope="module")
def pretraining(launch):
    return launch["pretraining"]


def _checkpoints(out) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(str(out / "models" / "checkpoint_iter=*.pt")))


def test_fratmae_pretraining_runs_two_processes_on_cpu(pretraining):
    # 4 demo cases, 2 ranks, batch 2: one iteration per rank; rank 0 alone writes the checkpoint
    assert _checkpoints(pretraining["fratmae_petct"]) == ["checkpoint_iter=1.pt"]


def test_spad_vit_mim_runs_two_processes_on_cpu(pretraining):
    out = pretraining["spad_vit"]
    # 12 demo images in aniso_d buckets {0: 2, 1: 2, 2: 2, 5: 6}, batch 2: 6 batches, 3 per rank;
    # max_steps 3 -> one epoch of 3 iterations; rank 0 alone writes the checkpoint
    assert _checkpoints(out) == ["checkpoint_iter=3.pt"]
    assert os.path.isfile(out / "models" / "model.pt")


def test_panfm_pretraining_runs_two_processes_on_cpu(pretraining):
    out = pretraining["panfm_panorgan"]
    # 48 subjects, 2 ranks, batch 8, drop_last: 3 iterations per rank make one epoch; rank 0 writes the checkpoint
    assert _checkpoints(out) == ["checkpoint_iter=3.pt"]
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)


def test_midol_pretraining_runs_two_processes_on_cpu(pretraining):
    out = pretraining["midol_multimodal"]
    # rank 0 alone writes: one checkpoint for the one epoch, and the weights without DDP's "module." prefix
    assert len(_checkpoints(out)) == 1
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert state and not any(k.startswith("module.") for k in state)


# --- fine-tuning: every bundle and MONAI Label's multi-GPU /train of a served bundle ---

# bundle -> (fine-tuning configs, run length, the validation metric rank 0 logs)
FINETUNE = {
    "fratmae_petct": (["finetune_seg.json", "demo_seg.json"], {"epochs": 1}, "val_mean_dice"),
    "spad_vit": (["finetune_seg.json", "demo.json", "demo_seg.json"], {"max_steps": 2}, "val_mean_dice"),
    "panfm_panorgan": (["finetune.json", "demo_finetune.json"], {"max_steps": 2}, "val_macro_auroc"),
    "midol_multimodal": (["finetune_seg.json", "demo_seg.json"], {"epochs": 1}, "val_mean_dice"),
}


def _served_job(root) -> tuple[dict, dict]:
    """MONAI Label's multi-GPU ``/train`` of FratMAE's served segmentation: its train config (the served train.json
    with the datastore's pairs, the epochs and a CheckpointLoader of models/model.pt) exported, then
    multi_gpu_train.json merged over it."""
    bundle = os.path.join(REPO, "bundles", "fratmae_petct")
    _demo_weights(bundle, root / "w.pt")
    out = build_served_bundle(bundle, root / "w.pt", root / "served", demo=True)
    generate_synthetic_petct(str(root / "ds"), num_cases=3, shape=(24, 20, 40), spacing=(4.0, 4.0, 4.0), seed=4)
    export_petct_studies(str(root / "ds"), str(root / "studies"))
    pairs = studies_datalist(str(root / "studies"))
    config = json.loads((out / "configs" / "train.json").read_text())
    parser = ConfigParser(config)
    model = out / "models" / "model.pt"
    loader = {"_target_": "CheckpointLoader", "load_path": str(model), "load_dict": {"model": "$@network"},
              "strict": False}  # fmt: skip
    overrides = {"bundle_root": str(out), "train#trainer#max_epochs": 1, "train#dataset#data": pairs[:2],
                 "validate#dataset#data": pairs[2:], "val_interval": 1,
                 "train#handlers": [loader, *config["train"]["handlers"]]}  # fmt: skip
    for k, v in overrides.items():
        parser[k] = v
    exported = root / "monailabel_train.json"
    exported.write_text(json.dumps(parser.config, indent=2))
    job = {"config_file": [str(exported), str(out / "configs" / "multi_gpu_train.json")], "run_id": "run"}
    return job, {"model": model, "before": model.read_bytes()}


@pytest.fixture(scope="module")
def finetuning(launch):
    return launch["finetuning"]


PRE_LENGTHS = {"fratmae_petct": {"epochs": 1}, "spad_vit": {"max_steps": 3}, "panfm_panorgan": {"max_steps": 2},
               "midol_multimodal": {"epochs": 1}}  # fmt: skip


@pytest.fixture(scope="module")
def launch(data, tmp_path_factory):
    """Both mechanisms in one ``torchrun`` launch (one start of torchrun and two interpreters): every bundle's
    pre-training, then every bundle's fine-tuning and MONAI Label's multi-GPU ``/train`` of a served bundle."""
    root = tmp_path_factory.mktemp("ddp")
    pre_root, ft_root = root / "pretraining", root / "finetuning"
    jobs = {}
    for b, length in PRE_LENGTHS.items():
        extra = {"tokenizer_ckpt": data["tokenizer"]} if b == "spad_vit" else {}
        jobs[f"pre_{b}"] = {"config_file": configs(b, "train.json", "demo.json", "multi_gpu_train.json"),
                            "overrides": {"dataset_dir": data[b], "output_dir": str(pre_root / b), **length,
                                          **extra}}  # fmt: skip
    for b, (names, length, _) in FINETUNE.items():
        pre = data["fratmae_pre"] if b == "fratmae_petct" else "none"  # the others start from random weights
        dataset = data["fratmae_finetune"] if b == "fratmae_petct" else data[b]
        jobs[f"ft_{b}"] = {"config_file": configs(b, *names, "multi_gpu_finetune.json"),
                           "overrides": {"dataset_dir": dataset, "output_dir": str(ft_root / b),
                                         "pretrained_checkpoint": pre, "val_interval": 1, **length}}  # fmt: skip
    (root / "serve").mkdir()
    jobs["ft_served"], served = _served_job(root / "serve")
    logs = torchrun_jobs(jobs, root)
    for b in PRE_LENGTHS:  # each rank's trainer logs the end of its run: both ranks stepped through their epochs
        log = logs[f"pre_{b}"]
        assert log.count("Engine run finished") == 2, (b, log[-3000:])
    return {"pretraining": {b: pre_root / b for b in PRE_LENGTHS},
            "finetuning": {"logs": {name[len("ft_"):]: log for name, log in logs.items() if name.startswith("ft_")},
                           "out": {b: ft_root / b for b in FINETUNE}, "served": served}}  # fmt: skip


@pytest.mark.parametrize("bundle", sorted(FINETUNE))
def test_finetuning_runs_two_processes_on_cpu(finetuning, bundle):
    log, out = finetuning["logs"][bundle], finetuning["out"][bundle]
    metric = FINETUNE[bundle][2]
    lines = [ln for ln in log.splitlines() if "Epoch[1] Metrics -- " in ln and metric in ln]
    assert len(lines) == 1, log[-3000:]  # rank 0's StatsHandler
    weights = torch.load(out / "models" / "model.pt", weights_only=True)
    assert weights and not any(k.startswith("module.") for k in weights)
    if bundle == "fratmae_petct":  # both ranks start from the pre-trained encoders
        assert log.count("loaded 58 encoder tensors") == 2, log[-3000:]  # each rank's network
        assert log.count("Epoch[1] Metrics -- val_mean_dice") == 1, log[-3000:]


def test_served_multi_gpu_training_as_monailabel_launches_it(finetuning):
    """Both ranks step and validate with the unwrapped network; rank 0 logs and rewrites models/model.pt."""
    log, served = finetuning["logs"]["served"], finetuning["served"]
    assert "Epoch: 1/1, Iter: 1/1" in log, log[-3000:]
    # rank 0's StatsHandler only: the served weights' validation before training, then epoch 1's
    assert log.count("Epoch[1] Metrics -- val_mean_dice") == 2, log[-3000:]
    before, epoch = _served_and_epoch_scores(log)
    assert (served["model"].read_bytes() != served["before"]) == _replaced(before, epoch), (before, epoch)
