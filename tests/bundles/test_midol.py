"""M-IDoL bundle end to end through its configs (``monai.bundle``'s ``ConfigWorkflow``, in this process) on the
synthetic five-modality demo: pre-training, classification fine-tuning and linear probing, lesion segmentation,
inference and evaluation."""

from __future__ import annotations

import csv
import glob
import os

import numpy as np
import pytest
import torch
from PIL import Image

from medfm.data import MODALITIES, build_image_folder_datalist

from .helpers import (
    event_tags,
    run_bundle,
    workflow,
    zoo_checks_and_export,
)

B = "midol_multimodal"
pytestmark = pytest.mark.slow


def _cli(cwd, names, *overrides, mode="training", cli=False):
    return run_bundle(B, cwd, names, *overrides, mode=mode, cli=cli)


@pytest.fixture(scope="module")
def chain(tmp_path_factory, demo_data):
    root = tmp_path_factory.mktemp("midol")
    data = demo_data(B)
    out = {k: str(root / k) for k in ("pre", "cls", "probe", "seg", "inf", "eval")}
    common = ["--dataset_dir", data]
    # every run in-process: this bundle's command-line run is the inference of
    # test_bad_files.py::test_cli_exits_non_zero_after_writing_the_good_predictions
    _cli(root, ["train.json", "demo.json"], *common, "--output_dir", out["pre"], "--epochs", "2")
    pre = os.path.join(out["pre"], "models", "model.pt")
    _cli(
        root,
        ["finetune_seg.json", "finetune_cls.json", "demo_seg.json", "demo_cls.json"],
        *common,
        "--output_dir",
        out["cls"],
        "--pretrained_checkpoint",
        pre,
    )
    probe = ["finetune_seg.json", "finetune_cls.json", "linear_probe_cls.json", "demo_seg.json", "demo_cls.json"]
    _cli(root, probe, *common, "--output_dir", out["probe"],
         "--pretrained_checkpoint", pre)  # fmt: skip
    _cli(
        root,
        ["finetune_seg.json", "demo_seg.json"],
        *common,
        "--output_dir",
        out["seg"],
        "--pretrained_checkpoint",
        pre,
    )
    seg = os.path.join(out["seg"], "models", "model.pt")
    _cli(
        root,
        ["inference.json", "demo_inference.json"],
        *common,
        "--output_dir",
        out["inf"],
        "--ckpt_path",
        seg,
        mode=None,
    )
    _cli(root, ["inference.json", "evaluate.json", "demo_inference.json"], *common, "--output_dir", out["eval"],
         "--ckpt_path", seg, mode=None)  # fmt: skip
    return {"root": root, "data": data, "pre_ckpt": pre, "seg_ckpt": seg, **out}


def test_pretraining_logs_both_losses_and_expert_use(chain):
    scalars, _ = event_tags(os.path.join(chain["pre"], "logs"))
    for term in ("cst", "route", "momentum", "weight_decay", "expert_0"):
        assert any(t.endswith(term) for t in scalars), (term, sorted(scalars))
    state = torch.load(chain["pre_ckpt"], weights_only=True)
    assert any(k.startswith("teacher.backbone.") for k in state)
    # the demo mixes all five modalities
    assert {d["modality"] for d in build_image_folder_datalist(chain["data"])} == set(MODALITIES)


def test_downstream_start_from_the_teacher_backbone(chain):
    pre = torch.load(chain["pre_ckpt"], weights_only=True)
    probe = torch.load(os.path.join(chain["probe"], "models", "last_model.pt"), weights_only=True)
    for k, v in probe.items():
        if k.startswith("backbone."):
            torch.testing.assert_close(v, pre["teacher." + k])  # frozen in the linear probe
    scalars, _ = event_tags(os.path.join(chain["cls"], "logs"))
    assert {"val_auc", "val_accuracy", "train_loss"} <= scalars, scalars
    scalars, _ = event_tags(os.path.join(chain["seg"], "logs"))
    assert "val_mean_dice" in scalars, scalars


def test_inference_masks_have_the_input_size(chain):
    images = sorted(glob.glob(os.path.join(chain["data"], "dermoscopy", "*.png")))
    assert images
    for path in images:
        name = os.path.basename(path)[: -len(".png")]
        pred = Image.open(os.path.join(chain["inf"], f"{name}_seg.png"))
        assert pred.size == Image.open(path).size
        assert set(np.unique(np.asarray(pred))) <= {0, 1}


def test_evaluation_reports_dice_per_image(chain):
    rows = list(csv.reader(open(os.path.join(chain["eval"], "mean_dice_raw.csv"))))
    assert len(rows) - 1 == len(glob.glob(os.path.join(chain["data"], "dermoscopy", "*.png")))
    values = [float(r[1]) for r in rows[1:]]
    assert all(0.0 <= v <= 1.0 for v in values)


def test_no_routing_switch_turns_the_routing_loss_off(chain, tmp_path):
    wf = workflow(B, ["train.json", "demo.json", "no_routing.json"], dataset_dir=chain["data"],
                  output_dir=str(tmp_path / "out"), epochs=1)  # fmt: skip
    wf.initialize()
    assert wf.parser.get_parsed_content("loss_def").route_weight == 0.0
    wf.run()
    assert os.path.isfile(tmp_path / "out" / "models" / "model.pt")


def test_metadata_net_in_out_and_export(chain, tmp_path):
    ts = zoo_checks_and_export(B, chain["seg_ckpt"], [1, 3, 32, 32], tmp_path)
    assert torch.jit.load(ts)(torch.rand(1, 3, 32, 32)).shape == (1, 2, 32, 32)
