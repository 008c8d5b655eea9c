"""FratMAE pre-training bundle, end to end through the entry points users use."""

from __future__ import annotations

import glob
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from medfm.data import generate_synthetic_petct
from medfm.networks.nets import FratMAE

from .helpers import (
    error_text,
    event_tags,
    run_bundle,
    workflow,
)

pytestmark = pytest.mark.slow  # end-to-end runs through the bundle configs

B = "fratmae_petct"
TRAIN = ["train.json", "demo.json"]


@pytest.fixture(scope="module")
def demo_dir(demo_data):
    return demo_data(B)


def _run_inprocess(tmp_path, demo_dir, extra=(), **override):
    wf = workflow(B, [*TRAIN, *extra], dataset_dir=demo_dir, output_dir=str(tmp_path / "out"), epochs=1, **override)
    wf.initialize()
    wf.run()
    trainer = wf.parser.get_parsed_content("train#trainer")
    return wf, trainer


def test_demo_runs_from_another_directory(tmp_path):
    """In this process (FratMAE's command-line runs: the killed and resumed run of ``test_exact_resume.py``)."""
    data, out = tmp_path / "data", tmp_path / "out"
    run_bundle(B, tmp_path, TRAIN, "--dataset_dir", str(data), "--output_dir", str(out), "--epochs", "2", mode=None)
    assert len(glob.glob(str(data / "imagesTr" / "*_0001.nii.gz"))) == 8  # demo data generated where asked
    ckpts = glob.glob(str(out / "models" / "checkpoint_iter=*.pt"))
    assert ckpts
    ck = torch.load(ckpts[0], weights_only=True)
    assert set(ck) == {"model", "optimizer", "lr_scheduler", "trainer"}
    weights = torch.load(out / "models" / "model.pt", weights_only=True)
    assert set(weights) == set(ck["model"])
    scalars, images = event_tags(str(out / "logs"))
    assert {"loss", "mse", "infonce", "lr"} <= scalars
    assert images & {"recon/pet", "recon/ct"}
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "variant,cross_modal,context_align",
    [("mae.json", False, False), ("mae_contextalign.json", False, True),
     ("fratmae_no_contextalign.json", True, False), (None, True, True)],
)  # fmt: skip
def test_ablation_switches(tmp_path, demo_dir, variant, cross_modal, context_align):
    _, trainer = _run_inprocess(tmp_path, demo_dir, [variant] if variant else [])
    net = trainer.network
    assert isinstance(net, FratMAE)
    assert (net.text_encoder is not None) == context_align
    assert all((blk.cross_attn is not None) == cross_modal for blk in net.decoders["pet"].blocks)
    terms = trainer.state.output["terms"]
    assert ("infonce" in terms) == context_align
    assert np.isfinite(terms["loss"])
    masked = [k[:-5] for k in trainer.state.output["pred"] if k.endswith("_pred")]
    assert len(masked) == (1 if cross_modal else 2)


@pytest.mark.parametrize("stack,expected", [("coronal", (64, 16, 96)), ("axial", (64, 64, 16))])
def test_axial_and_coronal_stacks(tmp_path, demo_dir, stack, expected):
    extra = ["axial.json"] if stack == "axial" else []
    _, trainer = _run_inprocess(tmp_path, demo_dir, extra)
    assert tuple(trainer.state.batch["pet"].shape[2:]) == expected
    assert tuple(trainer.state.batch["ct"].shape[2:]) == expected


# --- bad input stops with a clear error naming the case and the problem ---


def _case_dir(tmp_path, mutate):
    d = tmp_path / "bad"
    generate_synthetic_petct(str(d), num_cases=2, shape=(32, 24, 48), spacing=(12.0, 12.0, 36.0), seed=1)
    mutate(d)
    return str(d)


def _nan_pet(d):
    p = d / "imagesTr" / "demo_001_0001.nii.gz"
    img = nib.load(p)
    arr = np.asarray(img.dataobj, dtype=np.float32)
    arr[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), p)


def _shape_mismatch(d):
    p = d / "imagesTr" / "demo_001_0000.nii.gz"
    img = nib.load(p)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), p)


def _affine_mismatch(d):
    p = d / "imagesTr" / "demo_001_0000.nii.gz"
    img = nib.load(p)
    aff = img.affine.copy()
    aff[0, 3] += 7.0
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff), p)


def _unreadable(d):
    (d / "imagesTr" / "demo_001_0001.nii.gz").write_bytes(b"this is not a NIfTI file")


@pytest.mark.parametrize(
    "mutate,problem",
    [(_nan_pet, r"non-finite|NaN"), (_shape_mismatch, r"shape"), (_affine_mismatch, r"affine"),
     (_unreadable, r"read")],
)  # fmt: skip
def test_bad_case_stops_with_named_error(tmp_path, mutate, problem):
    d = _case_dir(tmp_path, mutate)
    with pytest.raises(Exception) as info:
        _run_inprocess(tmp_path, d)
    text = error_text(info.value)
    assert "demo_001" in text and re.search(problem, text, re.IGNORECASE), text[-2000:]


def test_empty_or_missing_dataset_dir_is_an_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    # demo.json never generates into an existing directory that holds no data
    with pytest.raises(Exception) as info:
        _run_inprocess(tmp_path, str(empty))
    assert str(empty) in error_text(info.value) and "no PET/CT cases" in error_text(info.value)
    # without demo.json a missing dataset_dir is an error, never a demo
    wf = workflow(B, ["train.json"], dataset_dir=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "o"))
    wf.initialize()
    with pytest.raises(Exception) as info:
        wf.run()
    assert str(tmp_path / "nowhere") in error_text(info.value)
    assert not (tmp_path / "nowhere").exists()
