"""tools/estimate_requirements.py against a closed form: a ViT's training FLOPs are about 6 x parameters x tokens."""

from __future__ import annotations

import math

from monai.bundle import ConfigParser

from ..bundles.helpers import REPO
from . import load_tool


def test_panfm_estimate_matches_six_params_tokens():
    tool = load_tool("estimate_requirements")
    got = tool.estimate("panfm_panorgan", tflops=100.0)
    parser = ConfigParser()
    parser.read_config(f"{REPO}/bundles/panfm_panorgan/configs/finetune.json")
    patch = parser["patch_size"]
    tokens = sum(math.prod(n // patch for n in shape) for shape in parser["organ_shapes"].values())
    d, layers, mlp, voxels = 768, 12, 3072, patch**3
    # matmul parameters a token passes through: patch embedding, per layer qkv + proj + MLP (biases ignored)
    per_token = voxels * d + layers * (4 * d * d + 2 * d * mlp)
    closed_form = 6 * per_token * tokens / 1e9  # forward 2 FLOPs per multiply-add, backward twice the forward
    assert abs(got["GFLOP_per_sample_fwd_bwd"] - closed_form) / closed_form < 0.03, (got, closed_form)
    assert got["s_per_1000_samples"] == round(1000 * got["GFLOP_per_sample_fwd_bwd"] * 1e9 / 100e12, 1)
