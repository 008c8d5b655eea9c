"""``bench.py midol``: M-IDoL's Swin step vs MONAI's SwinTransformer, and its multi-crop pipeline."""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .harness import (
    DATA_TARGET,
    FUSED_ADAMW,
    GPU_MFU_ASSUMED,
    H100_BF16_DENSE_FLOPS,
    MIDOL_TRAIN_CONFIG,
    Trainee,
    _add_step_options,
    _emit,
    _loadavg,
    _matmul_peak_record,
    _matmul_sweep,
    _note,
    _params,
    _r,
    _step_records,
    _time_rounds,
)

# ----------------------------------------------------------------------------------------------------------
# M-IDoL


@dataclass(frozen=True)
class MidolSize:
    """M-IDoL backbone sizes of one ``--size``."""

    image: int
    patch: int
    window: int
    embed: int
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    matmul_sizes: tuple[int, ...]
    extra_rounds_after_s: float
    data_images: int  # synthetic images per modality for the data pipeline
    data_size: int  # their side in pixels


MIDOL_SIZES = {
    # the reference: Swin-B at 224 px (patch 4, window 7, 128, 2-2-18-2, 4-8-16-32)
    "base": MidolSize(image=224, patch=4, window=7, embed=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32),
                      matmul_sizes=(2048, 3072, 4096), extra_rounds_after_s=90.0, data_images=2, data_size=512),
    "tiny": MidolSize(image=64, patch=2, window=4, embed=16, depths=(1, 1, 1, 1), heads=(1, 2, 2, 4),
                      matmul_sizes=(256, 512), extra_rounds_after_s=0.0, data_images=1, data_size=128),
}  # fmt: skip
# Forward-pass equivalents per image of one M-IDoL step, relative to the forward + backward (3) of one view:
# the student runs 2 global + num_local local views forward and backward, the teacher 2 global views forward.
MIDOL_VIEW_COST = {"num_global": 2, "num_local": 2}


class PooledSwin(nn.Module):
    """MONAI's 2D ``SwinTransformer`` (the SwinUNETR encoder) with the last stage average-pooled: the peer a MONAI
    user would build for M-IDoL's backbone."""

    def __init__(self, cfg: MidolSize) -> None:
        super().__init__()
        from monai.networks.nets.swin_unetr import SwinTransformer

        self.swin = SwinTransformer(in_chans=3, embed_dim=cfg.embed, window_size=(cfg.window,) * 2,
                                    patch_size=(cfg.patch,) * 2, depths=cfg.depths, num_heads=cfg.heads,
                                    drop_path_rate=0.1, spatial_dims=2)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swin(x)[-1].mean((2, 3))


class BackboneTrainee(Trainee):
    """One backbone step on a batch of views: pooled feature, a quadratic loss, backward, AdamW."""

    def __init__(self, name: str, module: nn.Module, batch: torch.Tensor) -> None:
        self.name, self.module, self.batch = name, module.train(), batch
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.04, fused=FUSED_ADAMW)

    def loss(self) -> torch.Tensor:
        return self.module(self.batch).float().pow(2).mean()


def _run_midol(args: argparse.Namespace) -> int:
    from medfm.networks.blocks import SwinBackbone

    cfg = MIDOL_SIZES[args.size]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads, b = torch.get_num_threads(), args.batch
    start = time.perf_counter()
    _note(f"midol --size {args.size}: batch {b} views of {cfg.image} px, {threads} threads, load {_loadavg()}")
    torch.manual_seed(0)
    fp32_start = _matmul_sweep(cfg.matmul_sizes, torch.float32, 3)
    batch = torch.rand(b, 3, cfg.image, cfg.image)
    ours = SwinBackbone(img_size=cfg.image, patch_size=cfg.patch, window_size=cfg.window, embed_dim=cfg.embed,
                        depths=cfg.depths, num_heads=cfg.heads, drop_path_rate=0.1)  # fmt: skip
    trainees = [BackboneTrainee("monai_swin", PooledSwin(cfg), batch), BackboneTrainee("midol_swin", ours, batch)]
    flops = {}
    for t in trainees:
        flops[t.name] = t.count_flops()
        gflop = flops[t.name]["flops_per_step"] / 1e9
        _note(f"{t.name}: {_params(t.module) / 1e6:.1f} M parameters, {gflop:.2f} GFLOP")
    runners = {t.name: t.step for t in trainees}
    samples, all_samples, rounds, clean = _time_rounds(
        runners, {n: max(0, args.warmup - 1) for n in runners}, args.steps, cfg.extra_rounds_after_s
    )
    rec, peak32, _ = _matmul_peak_record(fp32_start, {}, 3)
    _emit({"case": "matmul_peak", "size": args.size, "threads": threads, "sizes": list(cfg.matmul_sizes)} | rec)
    results = _step_records(
        list(runners), samples, all_samples, rounds, clean, flops, dict.fromkeys(runners, peak32),
        lambda n: {"case": n, "size": args.size, "batch": b, "input": [b, 3, cfg.image, cfg.image], "threads": threads,
                   "params": _params(next(t.module for t in trainees if t.name == n)),
                   "model": {"embed": cfg.embed, "depths": list(cfg.depths), "heads": list(cfg.heads),
                             "window": cfg.window, "patch": cfg.patch}},
    )  # fmt: skip
    mo, ou = results["monai_swin"], results["midol_swin"]
    if mo["mfu"] and ou["mfu"]:
        ou |= {"ratio_vs_monai": _r(ou["mfu"] / mo["mfu"]), "step_ratio_vs_monai": _r(ou["step_s"] / mo["step_s"]),
               "flops_ratio_vs_monai": _r(ou["flops_per_step"] / mo["flops_per_step"])}  # fmt: skip
    for n in results:
        _emit(results[n])
    if args.data:
        views = MIDOL_VIEW_COST["num_global"] * 3 + MIDOL_VIEW_COST["num_local"] * 3 + MIDOL_VIEW_COST["num_global"]
        train_rate = b / ou["step_s"] * 3 / views  # images per second one M-IDoL step consumes (estimate)
        flops_per_image = ou["flops_per_step"] / b * views / 3
        gpu_rate = GPU_MFU_ASSUMED * H100_BF16_DENSE_FLOPS / flops_per_image
        del trainees, runners
        gc.collect()
        for r in _run_midol_data(args, cfg, train_rate):
            _emit(r | {"flops_per_image": int(flops_per_image), "h100_samples_per_s_at_40pct": _r(gpu_rate),
                       "workers_to_feed_h100": _r(gpu_rate / (r["samples_per_s"] / max(1, r["workers"])), 1)})
    _note(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _run_midol_data(args: argparse.Namespace, cfg: MidolSize, train_rate: float) -> list[dict[str, Any]]:
    """The pre-training pipeline of bundles/midol_multimodal/configs/train.json (decoded images cached, then the
    multi-crop views) at ``--workers`` loader processes, against what an M-IDoL step consumes."""
    from monai.bundle import ConfigParser
    from monai.data import DataLoader, PersistentDataset

    from medfm.data import build_image_folder_datalist, generate_synthetic_midol

    parser = ConfigParser(globals={"medfm": "medfm"})
    parser.read_config(str(MIDOL_TRAIN_CONFIG))
    for k in ("global_size", "local_size"):
        parser[k] = cfg.image
    transform = parser.get_parsed_content("train#preprocessing")
    records = []
    with tempfile.TemporaryDirectory(prefix="medfm_bench_") as tmp:
        generate_synthetic_midol(os.path.join(tmp, "data"), per_modality=cfg.data_images, size=cfg.data_size)
        datalist = build_image_folder_datalist(os.path.join(tmp, "data"))
        ds = PersistentDataset(datalist, transform=transform, cache_dir=os.path.join(tmp, "cache"))
        for i in range(len(ds)):
            ds[i]  # fill the decoded-image cache
        for workers in args.workers:
            loader = DataLoader(ds, batch_size=1, shuffle=False, num_workers=workers)
            n, t0 = 0, None
            for epoch in range(2 if workers else 1):  # with workers, the first epoch only starts them
                if epoch == (1 if workers else 0):
                    t0 = time.perf_counter()
                for _ in loader:
                    n += 1 if t0 is not None else 0
            rate = n / (time.perf_counter() - t0)
            records.append({"case": "midol_data", "size": args.size, "workers": workers, "images": len(ds),
                            "image_px": cfg.data_size, "views": 2 + MIDOL_VIEW_COST["num_local"],
                            "view_px": cfg.image, "samples_per_s": _r(rate), "train_samples_per_s": _r(train_rate),
                            "ratio_vs_train": _r(rate / train_rate),
                            "meets_target": rate / train_rate >= DATA_TARGET})  # fmt: skip
            _note(f"midol data, {workers} workers: {rate:.2f} images/s")
    return records


def _add_midol(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("midol", help="M-IDoL's Swin step vs MONAI's SwinTransformer, and its multi-crop rate")
    p.add_argument("--size", choices=sorted(MIDOL_SIZES), default="base", help="model size (default base)")
    _add_step_options(p, "views per step")
    p.add_argument("--data", action=argparse.BooleanOptionalAction, default=True, help="time the data pipeline")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader processes (default 0 2)")
    p.set_defaults(func=_run_midol)
