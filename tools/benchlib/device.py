"""``bench.py gpu``: every model and its MONAI peer on one device."""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .fratmae import FRATMAE_SIZES, FratMAETrainee, MonaiMAETrainee, _prompt_ids
from .harness import (
    Trainee,
    _emit,
    _matmul_peak_record,
    _matmul_sweep,
    _note,
    _params,
    _r,
    _step_records,
    _sync,
    _time_rounds,
)
from .midol import MIDOL_SIZES, BackboneTrainee, PooledSwin
from .spad import SPAD_SIZES, MimHeadViT, SpadMIMTrainee

# ----------------------------------------------------------------------------------------------------------
# every model and its MONAI peer on one device (GPU mode)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _place(t: Trainee, device: torch.device, bf16: bool) -> Trainee:
    """Move a trainee's model, batch and batch-preparing modules (e.g. SPAD-VT) to ``device``, before its first
    optimizer step (the optimizer holds the same parameter objects), and switch its bf16 autocast."""
    t.module.to(device)
    t.batch = _to_device(t.batch, device)
    for part in getattr(getattr(t, "prepare", None), "__dict__", {}).values():
        if isinstance(part, nn.Module):
            part.to(device)
    t.device = device
    if isinstance(t, FratMAETrainee):
        t.bf16 = bf16  # the forward under autocast, the loss outside, as TrainingIteration(bf16=True)
    else:
        t.autocast_bf16 = bf16
    return t


def _device_pairs(model: str, size: str, b: int) -> list[Trainee]:
    """The MONAI peer and our model for ``fratmae``, ``spad`` or ``midol`` (as their own subcommands build them)."""
    torch.manual_seed(0)
    if model == "fratmae":
        cfg = FRATMAE_SIZES[size]
        prompt_ids, tokenizer = _prompt_ids(b, 32)
        batch = {"pet": torch.rand(b, 1, *cfg.spatial), "ct": torch.rand(b, 1, *cfg.spatial), "prompt_ids": prompt_ids}
        return [MonaiMAETrainee(cfg, batch), FratMAETrainee(cfg, batch, tokenizer)]
    if model == "spad":
        from medfm.networks.nets.spad_vit import SpadViTMIM
        from medfm.networks.nets.spad_vt import SpadVT

        cfg = SPAD_SIZES[size]
        tok = SpadVT(channels=cfg.tok_channels, num_codes=cfg.codes, code_dim=cfg.code_dim).eval()
        batch = {"image": torch.rand(b, 3, *cfg.spatial), "aniso_d": torch.zeros(b, dtype=torch.long)}
        ours = SpadViTMIM(num_codes=cfg.codes, hidden_size=cfg.hidden, num_layers=cfg.layers, num_heads=cfg.heads,
                          mlp_dim=cfg.mlp, pos_embed_shape=cfg.tokens)  # fmt: skip
        return [SpadMIMTrainee("monai_vit", MimHeadViT(cfg), tok, cfg, batch),
                SpadMIMTrainee("spad_vit", ours, tok, cfg, batch)]  # fmt: skip
    from medfm.networks.blocks import SwinBackbone

    cfg = MIDOL_SIZES[size]
    batch = torch.rand(b, 3, cfg.image, cfg.image)
    ours = SwinBackbone(img_size=cfg.image, patch_size=cfg.patch, window_size=cfg.window, embed_dim=cfg.embed,
                        depths=cfg.depths, num_heads=cfg.heads, drop_path_rate=0.1)  # fmt: skip
    return [BackboneTrainee("monai_swin", PooledSwin(cfg), batch), BackboneTrainee("midol_swin", ours, batch)]


def _peak_memory(t: Trainee) -> float | None:
    """GiB allocated at most during one more step on an accelerator (None on the CPU)."""
    if t.device.type != "cuda":
        return None
    _sync(t.device)
    torch.cuda.reset_peak_memory_stats(t.device)
    t.step()
    _sync(t.device)
    return torch.cuda.max_memory_allocated(t.device) / 2**30


def _run_device(args: argparse.Namespace) -> int:
    """``gpu``: each model and its MONAI peer in one process on ``--device``, bf16 autocast (``--no-bf16``: fp32),
    optionally ``torch.compile``; MFU against the matmul peak measured on that device in the same run."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device.")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    tag = "bf16" if args.bf16 else "fp32"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    _note(f"gpu mode on {device} ({name}), {tag}, compile {args.compile}, batch {args.batch}, size {args.size}")
    start = _matmul_sweep(args.matmul_sizes, dtype, 5, device)
    results: list[dict[str, Any]] = []
    for model in args.models:
        trainees, flops = [], {}
        for t in (_place(t, device, args.bf16) for t in _device_pairs(model, args.size, args.batch)):
            try:
                flops[t.name] = t.count_flops()  # also the first warm-up step
            except RuntimeError as err:  # e.g. MONAI's MaskedAutoEncoderViT under bf16 autocast
                _note(f"{t.name} cannot run here ({tag}): {err}")
                _emit({"case": f"gpu_{t.name}", "model": model, "device": name, "precision": tag,
                       "error": str(err).splitlines()[0]})  # fmt: skip
                continue
            trainees.append(t)
            _note(f"{t.name}: {_params(t.module) / 1e6:.1f} M parameters, {flops[t.name]['flops_per_step'] / 1e9:.1f} "
                  "GFLOP per step")  # fmt: skip
            if args.compile:
                t.module = torch.compile(t.module)

        def runner(t: Trainee) -> Callable[[], None]:
            return lambda: (t.step(), _sync(device))

        runners = {t.name: runner(t) for t in trainees}
        params = {t.name: _params(t.module) for t in trainees}
        warm = {t.name: args.warmup + (2 if args.compile else 0) for t in trainees}
        samples, all_samples, rounds, clean = _time_rounds(runners, warm, args.steps, 0.0)
        memory = {t.name: _peak_memory(t) for t in trainees}
        rec, peak32, peak16 = _matmul_peak_record(start if not args.bf16 else {}, start if args.bf16 else {}, 5,
                                                  device)  # fmt: skip
        peak = peak16 if args.bf16 else peak32
        recs = _step_records(
            list(runners), samples, all_samples, rounds, clean, flops, dict.fromkeys(runners, peak),
            lambda n, fields=dict(model=model, device=name, precision=tag, compile=args.compile, size=args.size,
                                  batch=args.batch), params=params, memory=memory: {
                "case": f"gpu_{n}", **fields, "params": params[n], "peak_memory_gib": _r(memory[n])},
        )  # fmt: skip
        if len(trainees) == 2 and recs[trainees[0].name]["mfu"] and recs[trainees[1].name]["mfu"]:
            peer, ours = recs[trainees[0].name], recs[trainees[1].name]
            ours |= {"ratio_vs_monai": _r(ours["mfu"] / peer["mfu"]),
                     "step_ratio_vs_monai": _r(ours["step_s"] / peer["step_s"])}  # fmt: skip
        batch_results = [{"case": "matmul_peak", "model": model, "device": name, "precision": tag,
                          "sizes": list(args.matmul_sizes)} | rec, *recs.values()]  # fmt: skip
        for r in batch_results:
            _emit(r)
        results += batch_results
        del trainees, runners
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


def _add_device(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gpu", help="every model and its MONAI peer on one device (bf16, optional compile)")
    p.add_argument("--device", default="cuda", help="torch device (default cuda; cpu runs the same code)")
    p.add_argument("--models", nargs="+", choices=["fratmae", "spad", "midol"], default=["fratmae", "spad", "midol"])
    p.add_argument("--size", choices=["base", "tiny"], default="base", help="model sizes (default base)")
    p.add_argument("--batch", type=int, default=16, help="batch per step for every model (default 16)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps after the FLOP count (default 2)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (default on)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (2 more warm-up steps)")
    p.add_argument("--matmul-sizes", type=int, nargs="+", default=[4096, 8192, 16384],
                   help="square matmul sizes for the peak (default 4096 8192 16384)")
    p.set_defaults(func=_run_device)
