"""tools/convert_midol.py and medfm.networks.midol_release: Microsoft Swin key names / shapes (as in M-IDoL.pth,
written out here for a tiny config) -> medfm's SwinBackbone."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from medfm.networks.blocks.swin import SwinBackbone
from medfm.networks.midol_release import convert_midol_backbone

from . import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "convert_midol.py")
TINY = {"img_size": 32, "patch_size": 2, "window_size": 4, "embed_dim": 16, "depths": [2, 2], "num_heads": [2, 4]}
HEAD = {"head.mlp.0.weight": (64, 32), "head.mlp.0.bias": (64,), "head.last_layer.weight_g": (1, 64)}


def _tool():
    return load_tool("convert_midol")


def official_swin_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Microsoft Swin (and M-IDoL ``backbone.*``) names and shapes for TINY, buffers included, random values."""
    ws, c0, res0 = 4, 16, 16
    shapes = {"patch_embed.proj.weight": (c0, 3, 2, 2), "patch_embed.proj.bias": (c0,)}
    shapes |= {"patch_embed.norm.weight": (c0,), "patch_embed.norm.bias": (c0,)}
    for i, heads in enumerate((2, 4)):
        c, res = c0 * 2**i, res0 // 2**i
        for j in range(2):
            p = f"layers.{i}.blocks.{j}."
            shapes |= {p + "norm1.weight": (c,), p + "norm1.bias": (c,)}
            shapes |= {p + "attn.relative_position_bias_table": ((2 * ws - 1) ** 2, heads)}
            shapes |= {p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,)}
            shapes |= {p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,)}
            shapes |= {p + "norm2.weight": (c,), p + "norm2.bias": (c,)}
            shapes |= {p + "mlp.fc1.weight": (4 * c, c), p + "mlp.fc1.bias": (4 * c,)}
            shapes |= {p + "mlp.fc2.weight": (c, 4 * c), p + "mlp.fc2.bias": (c,)}
        if i == 0:
            shapes |= {"layers.0.downsample.reduction.weight": (2 * c, 4 * c)}
            shapes |= {"layers.0.downsample.norm.weight": (4 * c,), "layers.0.downsample.norm.bias": (4 * c,)}
    shapes |= {"norm.weight": (32,), "norm.bias": (32,)}
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}
    for i, res in enumerate((16, 8)):  # persistent buffers of Microsoft's code
        for j in range(2):
            state[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(ws * ws, ws * ws).long()
        state[f"layers.{i}.blocks.1.attn_mask"] = torch.zeros((res // ws) ** 2, ws * ws, ws * ws)
    return state


def _dino_checkpoint():
    """A DINO-style checkpoint: teacher / student, each ``backbone.*`` + ``head.*``."""
    ckpt = {"epoch": 100}
    for seed, which in enumerate(("teacher", "student")):
        net = {f"backbone.{k}": v for k, v in official_swin_state(seed).items()}
        net |= {k: torch.randn(s) for k, s in HEAD.items()}
        ckpt[which] = net
    return ckpt


def test_teacher_maps_with_no_unmatched_backbone_key_and_matches_direct_loading():
    ckpt = _dino_checkpoint()
    model = SwinBackbone(**TINY).eval()
    report = convert_midol_backbone(ckpt, model)
    assert not report.missing_target and not report.shape_mismatch and report.backbone_ok and not report.ok
    assert sorted(report.head) == sorted(HEAD)
    assert sorted(k.split(" ")[0] for k in report.unused_source) == sorted(HEAD)  # the head only
    assert len(report.derived) == 4 + 2  # relative_position_index per block, attn_mask per shifted block
    model.load_state_dict(report.converted)  # strict
    # direct loading, as the authors' README does it (strip "backbone.", non-strict)
    direct = SwinBackbone(**TINY).eval()
    flat = {k.removeprefix("backbone."): v for k, v in ckpt["teacher"].items()}
    res = direct.load_state_dict(flat, strict=False)
    assert not res.missing_keys
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), direct(x))
    torch.testing.assert_close(model.norm.weight, ckpt["teacher"]["backbone.norm.weight"])


def test_student_and_ddp_prefixes():
    ckpt = _dino_checkpoint()
    report = convert_midol_backbone(ckpt, SwinBackbone(**TINY), which="student")
    torch.testing.assert_close(
        report.converted["layers.1.blocks.1.mlp.fc2.weight"],
        ckpt["student"]["backbone.layers.1.blocks.1.mlp.fc2.weight"],
    )
    flat = {f"module.backbone.{k}": v for k, v in official_swin_state().items()}
    assert convert_midol_backbone(flat, SwinBackbone(**TINY)).ok
    flat["module.backbone.head.weight"] = torch.zeros(10, 32)  # Microsoft's classifier: head, not an error
    report = convert_midol_backbone(flat, SwinBackbone(**TINY))
    assert report.backbone_ok and report.head == ["module.backbone.head.weight"]


def test_missing_and_misshapen_tensors_are_reported():
    state = official_swin_state()
    del state["layers.1.blocks.0.attn.qkv.bias"]
    state["norm.weight"] = torch.zeros(7)
    report = convert_midol_backbone(state, SwinBackbone(**TINY))
    assert report.missing_target == ["layers.1.blocks.0.attn.qkv.bias"]
    assert len(report.shape_mismatch) == 1 and report.shape_mismatch[0].startswith("norm.weight")
    assert not report.ok


@pytest.mark.slow
def test_cli_writes_a_strictly_loadable_backbone(tmp_path):
    ckpt = _dino_checkpoint()
    torch.save(ckpt, tmp_path / "M-IDoL.pth")
    out = tmp_path / "out" / "swin.pt"
    res = subprocess.run(
        [sys.executable, TOOL, "--ckpt", str(tmp_path / "M-IDoL.pth"), "--out", str(out),
         "--backbone-kwargs", json.dumps(TINY)],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "target tensors not in the checkpoint: 0" in res.stdout and "shape mismatches: 0" in res.stdout
    model = SwinBackbone(**TINY)
    model.load_state_dict(torch.load(out, weights_only=True))  # strict
    torch.testing.assert_close(
        model.layers[0].downsample.reduction.weight, ckpt["teacher"]["backbone.layers.0.downsample.reduction.weight"]
    )


def test_cli_flat_release_without_head_converts_cleanly(tmp_path):
    torch.save({f"backbone.{k}": v for k, v in official_swin_state().items()}, tmp_path / "M-IDoL.pth")
    out = tmp_path / "swin.pt"
    rc = _tool().main(
        ["--ckpt", str(tmp_path / "M-IDoL.pth"), "--out", str(out), "--backbone-kwargs", json.dumps(TINY)]
    )
    assert rc == 0 and out.exists()


@pytest.mark.parametrize("case", ["unused_backbone_key", "wrong_size", "missing_file"])
def test_cli_exits_1_and_writes_nothing(tmp_path, case, capsys):
    ckpt = _dino_checkpoint()
    if case == "unused_backbone_key":
        ckpt["teacher"]["backbone.layers.0.blocks.0.attn.extra.weight"] = torch.zeros(3)  # not in SwinBackbone
    torch.save(ckpt, tmp_path / "M-IDoL.pth")
    path = tmp_path / ("absent.pth" if case == "missing_file" else "M-IDoL.pth")
    kwargs = {} if case == "wrong_size" else TINY  # default Swin-B vs a tiny checkpoint: shape mismatches
    out = tmp_path / "swin.pt"
    rc = _tool().main(["--ckpt", str(path), "--out", str(out), "--backbone-kwargs", json.dumps(kwargs)])
    assert rc == 1 and not out.exists()
    text = capsys.readouterr()
    assert ("does not exist" in text.err) if case == "missing_file" else ("not written" in text.out)
    if case == "unused_backbone_key":  # --allow-partial writes what matched
        rc = _tool().main(
            ["--ckpt", str(path), "--out", str(out), "--backbone-kwargs", json.dumps(TINY), "--allow-partial"]
        )
        assert rc == 0 and out.exists()
