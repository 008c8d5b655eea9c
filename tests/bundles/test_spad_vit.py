"""SPAD-ViT bundle end to end through the ``monai.bundle`` CLI: tokenizer -> MIM -> segmentation fine-tuning ->
inference -> evaluation, and classification, on the mixed 2D/3D demo data."""

from __future__ import annotations

import csv
import glob
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from medfm.data import build_spad_datalist
from medfm.networks.nets import SpadViTMIM, SpadViTSegmenter, SpadVT

from .helpers import (
    configs,
    error_text,
    event_tags,
    run_bundle,
    workflow,
    zoo_checks_and_export,
)

B = "spad_vit"
pytestmark = pytest.mark.slow


def _cli(cwd, names, *overrides, mode="training", cli=False):
    return run_bundle(B, cwd, names, *overrides, mode=mode, cli=cli)


def _demo_sizes(name: str) -> dict:
    """``network_def#…`` overrides of a demo config as constructor keyword arguments (``$`` expressions evaluated)."""
    cfg = json.load(open(configs(B, name)[0]))
    return {k.split("#", 1)[1]: _value(v) for k, v in cfg.items() if k.startswith("network_def#")}


def _value(v):
    """A config value as a run reads it (``$medfm…`` expressions evaluated)."""
    return ConfigParser({"imports": ["$import medfm"], "v": v}).get_parsed_content("v")


def _tokenizer_sizes() -> dict:
    cfg = json.load(open(configs(B, "demo.json")[0]))
    return {k: v for k, v in cfg["tokenizer_def"].items() if k != "_target_"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, demo_data):
    """The demo chain, each step reading the previous step's output, all under one temporary folder."""
    root = tmp_path_factory.mktemp("spad")
    data = demo_data(B)
    out = {k: str(root / k) for k in ("tok", "mim", "seg", "inf", "eval", "cls")}
    common = ["--dataset_dir", data]
    # the command-line smoke run of this bundle; the other runs go in-process
    tok = ["train.json", "demo.json", "train_tokenizer.json", "demo_tokenizer.json"]
    _cli(root, tok, *common, "--output_dir", out["tok"], cli=True)
    tok_ckpt = os.path.join(out["tok"], "models", "model.pt")
    _cli(root, ["train.json", "demo.json"], *common, "--output_dir", out["mim"], "--tokenizer_ckpt", tok_ckpt)
    mim_ckpt = os.path.join(out["mim"], "models", "model.pt")
    _cli(root, ["finetune_seg.json", "demo.json", "demo_seg.json"], *common, "--output_dir", out["seg"],
         "--pretrained_checkpoint", mim_ckpt)  # fmt: skip
    seg_ckpt = os.path.join(out["seg"], "models", "model.pt")
    inf = ["inference.json", "demo_inference.json"]
    _cli(root, inf, *common, "--output_dir", out["inf"], "--ckpt_path", seg_ckpt, mode=None)
    _cli(root, ["inference.json", "evaluate.json", "demo_inference.json"], *common, "--output_dir", out["eval"],
         "--ckpt_path", seg_ckpt, mode=None)  # fmt: skip
    _cli(root, ["finetune_seg.json", "finetune_cls.json", "demo.json", "demo_cls.json"], *common,
         "--output_dir", out["cls"], "--pretrained_checkpoint", mim_ckpt)  # fmt: skip
    return {"root": root, "data": data, "tok_ckpt": tok_ckpt, "mim_ckpt": mim_ckpt, "seg_ckpt": seg_ckpt, **out}


def test_demo_data_mixes_2d_and_3d_levels(chain):
    items = build_spad_datalist(chain["data"], require_labels=True)
    assert {d["dim"] for d in items} == {2, 3}
    assert {d["aniso_d"] for d in items} == {0, 1, 2, 5}


def test_tokenizer_run_wrote_a_loadable_tokenizer_and_every_loss_term(chain):
    state = torch.load(chain["tok_ckpt"], weights_only=True)
    SpadVT(**_tokenizer_sizes()).load_state_dict(state)  # strict
    scalars, _ = event_tags(os.path.join(chain["tok"], "logs"))
    for term in ("rec", "usage", "entropy", "gan", "gan_enabled", "disc_loss", "disc_loss_ema"):
        assert any(t.endswith(term) for t in scalars), (term, scalars)
    last = sorted(glob.glob(os.path.join(chain["tok"], "models", "checkpoint_iter=*.pt")))[-1]
    ckpt = torch.load(last, weights_only=True)
    assert {"discriminator", "d_optimizer", "gan_gate", "trainer"} <= set(ckpt)


def test_mim_run_learns_and_its_weights_load(chain):
    model = SpadViTMIM(num_codes=64, **_demo_sizes("demo.json"))
    model.load_state_dict(torch.load(chain["mim_ckpt"], weights_only=True))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = []
    for f in glob.glob(os.path.join(chain["mim"], "logs", "events.out.tfevents.*")):
        acc = EventAccumulator(f)
        acc.Reload()
        tag = next(t for t in acc.Tags()["scalars"] if t.endswith("loss"))
        losses += [e.value for e in acc.Scalars(tag)]
    assert len(losses) >= 40 and all(np.isfinite(losses))
    # the soft-label CE on a 64-code vocabulary starts near log(64) = 4.16 and must fall
    assert np.mean(losses[-6:]) < np.mean(losses[:6]), losses


def test_segmentation_trained_on_2d_and_3d_and_loaded_the_pretrained_encoder(chain):
    split = json.load(open(os.path.join(chain["seg"], "split.json")))
    suffixes = {os.path.basename(p).split(".", 1)[1] for p in split["train"]}
    assert {"png", "nii.gz"} <= suffixes, suffixes
    seg = SpadViTSegmenter(4, deep_supervision=True, **_demo_sizes("demo_inference.json"))
    seg.load_state_dict(torch.load(chain["seg_ckpt"], weights_only=True))
    mim = torch.load(chain["mim_ckpt"], weights_only=True)
    # the fine-tuned encoder started from the MIM weights: the position embedding moved little from them
    drift = (seg.encoder.pos_embed - mim["pos_embed"]).norm() / mim["pos_embed"].norm()
    assert drift < 0.5, float(drift)


def test_inference_keeps_the_input_shape_and_affine(chain):
    images = sorted(glob.glob(os.path.join(chain["data"], "images", "*")))
    assert images
    for path in images:
        name = os.path.basename(path).split(".", 1)[0]
        out = nib.load(os.path.join(chain["inf"], f"{name}_seg.nii.gz"))
        pred = np.asarray(out.dataobj)
        assert set(np.unique(pred)) <= {0, 1, 2, 3}
        if path.endswith(".nii.gz"):
            src = nib.load(path)
            assert out.shape == src.shape
            np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
        else:  # MONAI reads a PNG as (width, height)
            w, h = Image.open(path).size
            assert out.shape == (w, h)


def test_evaluation_reports_dice_per_class(chain):
    rows = list(csv.reader(open(os.path.join(chain["eval"], "mean_dice_raw.csv"))))
    assert len(rows) - 1 == len(build_spad_datalist(chain["data"], require_labels=True))
    # one column per foreground class (labels 1..3) and their mean
    assert rows[0][1:] == ["class0", "class1", "class2", "mean"]
    values = np.array([[float(v) for v in r[1:]] for r in rows[1:]])
    assert np.all((values >= 0) & (values <= 1))
    np.testing.assert_allclose(values[:, 3], values[:, :3].mean(1), rtol=1e-5)
    metrics = open(os.path.join(chain["eval"], "metrics.csv")).read()
    assert "mean_dice" in metrics and "dice_per_class" in metrics


def test_classification_reports_auc_and_accuracy(chain):
    scalars, _ = event_tags(os.path.join(chain["cls"], "logs"))
    assert {"val_auc", "val_accuracy"} <= scalars, scalars
    assert os.path.isfile(os.path.join(chain["cls"], "models", "model.pt"))


def test_metadata_net_in_out_and_export(chain, tmp_path):
    ts = zoo_checks_and_export(B, chain["seg_ckpt"], [1, 3, 32, 64, 64], tmp_path)
    exported = torch.jit.load(ts)
    net = SpadViTSegmenter(4, deep_supervision=True, **_demo_sizes("demo_inference.json"))
    net.load_state_dict(torch.load(chain["seg_ckpt"], weights_only=True))
    x = torch.rand(1, 3, 32, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net.eval()(x), atol=1e-4, rtol=1e-4)


def test_missing_tokenizer_checkpoint_is_a_clear_error(chain, tmp_path):
    wf = workflow(B, ["train.json", "demo.json"], dataset_dir=chain["data"], output_dir=str(tmp_path / "out"),
                  tokenizer_ckpt=str(tmp_path / "nope.pt"))  # fmt: skip
    wf.initialize()
    with pytest.raises(Exception) as e:
        wf.run()
    assert "nope.pt does not exist" in error_text(e.value)


def test_user_dataset_dir_without_images_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    wf = workflow(B, ["train.json", "demo.json", "train_tokenizer.json", "demo_tokenizer.json"], dataset_dir=str(empty),
                  output_dir=str(tmp_path / "out"))  # fmt: skip
    wf.initialize()
    with pytest.raises(Exception) as e:
        wf.run()
    assert str(empty) in error_text(e.value) and "no images" in error_text(e.value)
    assert not os.path.exists(os.path.join(str(empty), "images"))
