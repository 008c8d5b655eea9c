"""Estimate what fine-tuning each bundle's task network at the paper's size needs, without a GPU.

    python tools/estimate_requirements.py [--tflops 100] [bundle ...]

For ``network_def`` of ``configs/inference.json`` (the task network, paper size) and the fine-tuning config's
batch size and crop, one training step of one sample is run on PyTorch's ``meta`` device (shapes only, nothing
is computed or allocated; on the CPU for a network that reads tensor values on the host, Pan-FM), with
``torch.utils.flop_counter.FlopCounterMode`` counting forward + backward FLOPs (matmuls and convolutions;
attention run by fused kernels may go uncounted) and a saved-tensors hook adding up
the bytes autograd keeps for backward (parameters excluded): the fp32 activation memory per sample. Prints one
JSON line per bundle with parameters, weights + gradients + AdamW state (16 bytes per parameter), activations
per sample and per batch, FLOPs per sample, and seconds per 1,000 training samples at ``--tflops`` sustained
TFLOP/s. These are estimates, not measurements on a GPU: real memory adds the CUDA context, allocator slack and
workspace, and bf16 autocast roughly halves the activations.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from monai.bundle import ConfigParser
from torch.utils.flop_counter import FlopCounterMode

from medfm.utils.release import FINETUNE_CONFIGS

REPO = Path(__file__).resolve().parents[1]
# fine-tuning config whose batch size and crop the estimate uses, per bundle (the one releases check)
FINETUNE = {bundle: configs[0] for bundle, configs in FINETUNE_CONFIGS.items()}


def _inputs(bundle: str, parser: ConfigParser, device: str) -> tuple:
    """One sample of the task network's input at the fine-tuning config's crop, on ``device``."""
    meta = {"device": device}
    if bundle == "fratmae_petct":
        return (torch.empty(1, 2, *parser.get_parsed_content("roi_size"), **meta),)
    if bundle == "spad_vit":
        size = [t * int(parser.get_parsed_content("patch_size")) for t in parser.get_parsed_content("crop_tokens")]
        return (torch.empty(1, 3, *size, **meta),)
    if bundle == "panfm_panorgan":
        shapes = parser.get_parsed_content("organ_shapes")
        organs = list(parser.get_parsed_content("organs"))
        images = {o: torch.rand(1, 1, *shapes[o], **meta) for o in organs}
        return images, torch.ones(1, len(organs), dtype=torch.bool, **meta)
    size = int(parser.get_parsed_content("image_size"))
    return (torch.empty(1, 3, size, size, **meta),)


def estimate(bundle: str, tflops: float) -> dict:
    configs = REPO / "bundles" / bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "inference.json")])
    parser["bundle_root"] = str(REPO / "bundles" / bundle)
    parser["dataset_dir"] = "/no/such/dataset"
    net = parser.get_parsed_content("network_def")
    params = sum(p.numel() for p in net.parameters())
    ft = ConfigParser()
    ft.read_config([str(configs / FINETUNE[bundle])])
    ft["bundle_root"] = str(REPO / "bundles" / bundle)
    ft["dataset_dir"] = "/no/such/dataset"
    batch = int(ft.get_parsed_content("batch_size"))
    saved = {"bytes": 0}

    def step(net: torch.nn.Module, device: str) -> int:
        own = {id(p) for p in net.parameters()}
        saved["bytes"] = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in own:
                saved["bytes"] += t.numel() * t.element_size()
            return t

        with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(*_inputs(bundle, ft, device))
            out = out[0] if isinstance(out, (list, tuple)) else out
            out.float().mean().backward()
        return counter.get_total_flops()

    try:
        flops = step(net.to("meta").train(), "meta")
    except NotImplementedError:  # a network that reads tensor values on the host (Pan-FM's presence mask): real CPU
        flops = step(parser.get_parsed_content("network_def", lazy=False).train(), "cpu")
    gib = 2**30
    return {
        "bundle": bundle,
        "network": type(net).__name__,
        "finetune_config": FINETUNE[bundle],
        "params_M": round(params / 1e6, 1),
        "weights_grads_adamw_GiB": round(16 * params / gib, 2),
        "activations_per_sample_GiB_fp32": round(saved["bytes"] / gib, 2),
        "batch_size": batch,
        "train_memory_GiB_fp32": round((16 * params + batch * saved["bytes"]) / gib, 1),
        "GFLOP_per_sample_fwd_bwd": round(flops / 1e9),
        "assumed_TFLOPs": tflops,
        "s_per_1000_samples": round(1000 * flops / (tflops * 1e12), 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundles", nargs="*", default=list(FINETUNE), help="bundle names (default: all four)")
    p.add_argument("--tflops", type=float, default=100.0, help="assumed sustained TFLOP/s of the GPU (default 100)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    for b in args.bundles:
        print(json.dumps(estimate(b, args.tflops)), flush=True)


if __name__ == "__main__":
    main()
