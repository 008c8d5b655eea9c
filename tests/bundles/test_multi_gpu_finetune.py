"""``multi_gpu_finetune.json`` of SPAD-ViT, Pan-FM and M-IDoL under torchrun with 2 processes on CPU (gloo).

FratMAE's, with the pre-trained encoders loaded on each rank, is in ``test_fratmae_downstream.py``; here the runs
start from random weights (``--pretrained_checkpoint none``) and check that both ranks train and validate together
(ignite's metrics all-reduce: a rank that skipped validation would leave the other waiting) while rank 0 alone logs
and writes the best model.
"""

from __future__ import annotations

import pytest
import torch

from medfm.data import ensure_demo_midol, ensure_demo_panfm, ensure_demo_spad

from .helpers import config_list, torchrun_two_processes

pytestmark = pytest.mark.slow

CASES = {
    "spad_vit": (["finetune_seg.json", "demo.json", "demo_seg.json"], ensure_demo_spad, ["--max_steps", "2"],
                 "val_mean_dice"),
    "panfm_panorgan": (["finetune.json", "demo_finetune.json"], ensure_demo_panfm, ["--max_steps", "2"],
                       "val_macro_auroc"),
    "midol_multimodal": (["finetune_seg.json", "demo_seg.json"], ensure_demo_midol, ["--epochs", "1"], "val_mean_dice"),
}  # fmt: skip


@pytest.mark.parametrize("bundle", sorted(CASES))
def test_finetuning_runs_two_processes_on_cpu(bundle, tmp_path):
    names, make_data, length, metric = CASES[bundle]
    data, out = tmp_path / "data", tmp_path / "out"
    make_data(str(data), seed=0)  # before the ranks start: two processes must not generate into one folder
    files = config_list(bundle, *names, "multi_gpu_finetune.json")
    args = ["--dataset_dir", str(data), "--output_dir", str(out), "--pretrained_checkpoint", "none",
            "--val_interval", "1", *length]  # fmt: skip
    # a rank that skipped validation would leave the other waiting in ignite's all-reduce: no exit
    log = torchrun_two_processes(files, args, str(tmp_path), engine_runs=None)
    lines = [ln for ln in log.splitlines() if "Epoch[1] Metrics -- " in ln and metric in ln]
    assert len(lines) == 1, log[-3000:]  # rank 0's StatsHandler
    weights = torch.load(out / "models" / "model.pt", weights_only=True)
    assert weights and not any(k.startswith("module.") for k in weights)
