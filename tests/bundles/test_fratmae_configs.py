"""FratMAE's shipped configs, parsed without running: optimiser groups and resampling settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Resized

from .helpers import configs, error_text

B = "fratmae_petct"
# (config files, overrides): pre-training and both fine-tuning tasks, at demo size
RUNS = {
    "train": (["train.json", "demo.json"], {}),
    "finetune_seg": (["finetune_seg.json", "demo_seg.json"], {"pretrained_checkpoint": "none"}),
    "finetune_stage": (["finetune_seg.json", "finetune_stage.json", "demo_seg.json", "demo_stage.json"],
                       {"pretrained_checkpoint": "none"}),
}


def _parser(names: list[str], **override) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(configs(B, *names))
    parser.update({"dataset_dir": "/nonexistent", "output_dir": "/tmp/unused", **override})
    return parser


@pytest.mark.parametrize("run", sorted(RUNS))
def test_weight_decay_spares_norms_biases_and_tokens(run):
    """MAE's setting (and the other bundles'): AdamW decay on weight matrices and kernels only."""
    names, override = RUNS[run]
    parser = _parser(names, **override)
    optimizer = parser.get_parsed_content("optimizer")
    network = parser.get_parsed_content("network")
    wd = parser.get_parsed_content("weight_decay")
    assert wd > 0
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(network.named_parameters())
    assert set(decay_of) == {id(p) for p in named.values() if p.requires_grad}
    for name, p in named.items():
        no_decay = p.ndim <= 1 or name.endswith(("cls_token", "mask_token", "pos_embed"))
        assert decay_of[id(p)] == (0.0 if no_decay else wd), name
    assert any(p.ndim >= 2 and decay_of[id(p)] == wd for p in named.values())


def _resize(parser: ConfigParser, key: str) -> Resized:
    found = [t for t in parser.get_parsed_content(key) if isinstance(t, Resized)]
    assert len(found) == 1, key
    return found[0]


@pytest.mark.parametrize(
    "run,key", [("train", "train#deterministic_transforms"), ("finetune_stage", "load_transforms")]
)
def test_whole_body_resize_keeps_small_hot_lesions(run, key):
    """A 2-voxel-wide hot lesion resized 2.5x smaller (the paper's ~400 -> 160) keeps its uptake wherever it sits:
    without anti-aliasing, trilinear sampling can miss it (integrated uptake down to ~0.2x) or double it."""
    names, override = RUNS[run]
    parser = _parser(names, **override, whole_body_size=[16, 32, 24])  # small grid, the paper's 2.5x ratio
    resize = _resize(parser, key)
    size = parser.get_parsed_content("whole_body_size")
    shape = tuple(int(round(s * 2.5)) for s in size)
    ratios = []
    for offset in range(5):  # every phase of the 2.5x sampling grid
        pet = torch.zeros(1, *shape)
        c = [s // 2 + offset for s in shape]
        pet[0, c[0] : c[0] + 2, c[1] : c[1] + 2, c[2] : c[2] + 2] = 10.0
        out = resize({"pet": pet, "ct": torch.zeros(1, *shape)})["pet"]
        assert tuple(out.shape[1:]) == tuple(size)
        ratios.append(float(out.sum()) * np.prod(shape) / np.prod(size) / float(pet.sum()))
    assert min(ratios) > 0.7 and max(ratios) < 1.3, ratios


def _cases(root, names):
    import nibabel as nib

    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    for case in names:
        for ch in ("0000", "0001"):
            path = str(root / "imagesTr" / f"{case}_{ch}.nii.gz")
            nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), path)


def test_pretraining_datalist_checks_prompts_and_leaves_out_held_out_cases(tmp_path):
    import json

    _cases(tmp_path, ["fdg_aa_01-01-2001", "fdg_bb_01-01-2001", "fdg_cc_01-01-2001"])
    parser = _parser(["train.json"], dataset_dir=str(tmp_path))
    with pytest.raises(Exception) as err:  # FDG cases only and no table: one prompt for all
        parser.get_parsed_content("train#datalist")
    assert "ContextAlign is on but all 3 cases" in error_text(err.value)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["fdg_aa_01-01-2001"], "val": ["fdg_cc_01-01-2001"]}))
    parser = _parser(["train.json"], dataset_dir=str(tmp_path), context_align=False, exclude_split_file=str(split))
    kept = [d["case"] for d in parser.get_parsed_content("train#datalist")]
    assert kept == ["fdg_aa_01-01-2001", "fdg_bb_01-01-2001"]


@pytest.mark.parametrize(
    "stack,roi", [("coronal", [160, 32, 192]), ("axial", [160, 160, 32]), ("cube", [96, 96, 96])]
)
def test_segmentation_patch_is_a_switch_of_fine_tuning_and_inference(stack, roi):
    """Native-resolution coronal stacks by default (the paper), axial stacks for Table 2's baseline, 96³ cubes."""
    seg = _parser(["finetune_seg.json"], stack=stack, pretrained_checkpoint="none")
    assert seg.get_parsed_content("roi_size") == roi
    crops = [t for t in seg.get_parsed_content("train#random_transforms") if "PosNeg" in type(t).__name__]
    assert list(crops[0].cropper.spatial_size) == roi
    assert list(seg.get_parsed_content("validate#inferer").roi_size) == roi
    inf = _parser(["inference.json"], stack=stack)
    assert list(inf.get_parsed_content("inferer").roi_size) == roi


def test_segmentation_roi_errors():
    from medfm.transforms import segmentation_roi

    assert segmentation_roi("coronal", (32, 32, 64), 8) == [32, 8, 64]
    with pytest.raises(ValueError, match="stack must be one of"):
        segmentation_roi("sagittal")
    with pytest.raises(ValueError, match="cube_size"):
        segmentation_roi("cube", cube_size=0)
