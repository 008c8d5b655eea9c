"""tools/convert_pumit.py: the authors' release (key names and shapes of pumit-b.ckpt / simple-soft.ckpt) -> medfm."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from medfm.networks.nets import SpadViTMIM, SpadVT
from medfm.networks.pumit_release import convert_pumit_tokenizer

from ..helpers_spad import TINY_VIT, official_vit_state
from . import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "convert_pumit.py")
TINY_TOK = {"channels": [8, 16, 32], "num_codes": 24, "code_dim": 16}


def _run(*args):
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300
    )


def _release_files(tmp_path):
    vit = official_vit_state()
    torch.save({"state_dict": vit, "epoch": 3, "global_step": 30000}, tmp_path / "pumit-b.ckpt")  # Lightning
    tok = {k: torch.randn_like(v) for k, v in SpadVT(**TINY_TOK).state_dict().items()}
    torch.save({"model": tok, "step": 7}, tmp_path / "simple-soft.ckpt")  # Fabric
    return vit, tok


@pytest.mark.slow
def test_converter_maps_both_release_checkpoints_without_unmatched_keys(tmp_path):
    vit, tok = _release_files(tmp_path)
    out = tmp_path / "out"
    res = _run("--vit", str(tmp_path / "pumit-b.ckpt"), "--tokenizer", str(tmp_path / "simple-soft.ckpt"),
               "--out-dir", str(out), "--vit-kwargs", json.dumps({"num_codes": 24, **TINY_VIT}),
               "--tokenizer-kwargs", json.dumps(TINY_TOK))  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("source tensors not used: 0") == 2
    assert res.stdout.count("target tensors not in the checkpoint: 0") == 2
    mim = SpadViTMIM(num_codes=24, **TINY_VIT)
    mim.load_state_dict(torch.load(out / "spad_vit_mim.pt", weights_only=True))  # strict
    torch.testing.assert_close(mim.blocks[1].attn.qkv.weight[32:64], vit["blocks.1.attn.k_proj.weight"])
    torch.testing.assert_close(mim.blocks[0].mlp.fc1.bias[48:], vit["blocks.0.mlp.w2.bias"])
    torch.testing.assert_close(mim.mim_head[2].weight, vit["mim_head.2.weight"])
    vt = SpadVT(**TINY_TOK)
    vt.load_state_dict(torch.load(out / "spad_vt.pt", weights_only=True))  # strict
    for k, v in vt.state_dict().items():
        torch.testing.assert_close(v, tok[k])


def test_converter_refuses_and_writes_nothing_when_keys_do_not_match(tmp_path, capsys):
    """The tool's ``main`` in this process (its command line is the test above)."""
    _release_files(tmp_path)
    out = tmp_path / "out"
    tool = load_tool("convert_pumit")
    # the release is ViT-tiny here; converting into the default ViT-B must fail on shapes
    assert tool.main(["--vit", str(tmp_path / "pumit-b.ckpt"), "--out-dir", str(out)]) == 1
    stdout = capsys.readouterr().out
    assert "shape mismatches" in stdout and "not written" in stdout
    assert not (out / "spad_vit_mim.pt").exists()


def test_tokenizer_conversion_reports_foreign_keys():
    state = SpadVT(**TINY_TOK).state_dict()
    state["loss.discriminator.0.weight"] = torch.zeros(1)
    report = convert_pumit_tokenizer(state, SpadVT(**TINY_TOK))
    assert report.unused_source == ["loss.discriminator.0.weight"] and not report.missing_target
