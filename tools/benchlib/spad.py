"""``bench.py spad``: SPAD-ViT's MIM step vs MONAI's ViT of the same size, and its data pipeline."""

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
    SPAD_TRAIN_CONFIG,
    Trainee,
    _add_step_options,
    _emit,
    _loadavg,
    _matmul_peak_record,
    _matmul_sweep,
    _note,
    _params,
    _profile,
    _r,
    _step_records,
    _time_rounds,
    _timed,
)

# ----------------------------------------------------------------------------------------------------------
# SPAD-ViT


@dataclass(frozen=True)
class SpadSize:
    """SPAD-ViT MIM sizes of one ``--size``."""

    tokens: tuple[int, int, int]  # token grid of the crop (isotropic: aniso_d = 0)
    hidden: int
    layers: int
    heads: int
    mlp: int  # SwiGLU width (MONAI's GELU MLP gets 1.5x this: the same FLOPs)
    tok_channels: tuple[int, int, int]
    codes: int
    code_dim: int
    mask_ratio: float
    matmul_sizes: tuple[int, ...]
    matmul_repeats: int
    extra_rounds_after_s: float
    data_2d: int  # synthetic images for the data pipeline case
    data_3d: int
    data_size_2d: int
    data_size_3d: int

    @property
    def spatial(self) -> tuple[int, int, int]:
        return tuple(16 * t for t in self.tokens)  # type: ignore[return-value]


SPAD_SIZES = {
    # the release: ViT-B (768/12/12, SwiGLU 2048), SPAD-VT 1024 x 512 codes, MIM crops of 5 x 10 x 10 tokens
    "base": SpadSize(tokens=(5, 10, 10), hidden=768, layers=12, heads=12, mlp=2048, tok_channels=(128, 256, 512),
                     codes=1024, code_dim=512, mask_ratio=0.55, matmul_sizes=(2048, 3072, 4096), matmul_repeats=3,
                     extra_rounds_after_s=90.0, data_2d=4, data_3d=6, data_size_2d=512, data_size_3d=256),
    "tiny": SpadSize(tokens=(2, 4, 4), hidden=48, layers=2, heads=3, mlp=128, tok_channels=(8, 16, 32), codes=64,
                     code_dim=32, mask_ratio=0.55, matmul_sizes=(512, 1024), matmul_repeats=3,
                     extra_rounds_after_s=5.0, data_2d=2, data_3d=3, data_size_2d=96, data_size_3d=64),
}  # fmt: skip


class MimHeadViT(nn.Module):
    """MONAI's ViT with the SPAD-ViT MIM head on its patch tokens (no CLS): what a MONAI user would build."""

    def __init__(self, cfg: SpadSize) -> None:
        super().__init__()
        from monai.networks.nets import ViT

        self.vit = ViT(
            in_channels=3, img_size=cfg.spatial, patch_size=16, hidden_size=cfg.hidden, mlp_dim=cfg.mlp * 3 // 2,
            num_layers=cfg.layers, num_heads=cfg.heads, proj_type="conv", pos_embed_type="learnable",
            classification=False, qkv_bias=True, spatial_dims=3,
        )  # fmt: skip
        self.mim_head = nn.Sequential(nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.codes))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.vit(x)[0]
        return {"logits": self.mim_head(tokens[mask]), "mask": mask}


class SpadMIMTrainee(Trainee):
    """One MIM step: soft-token targets from the frozen SPAD-VT, the model, soft-label CE, backward, AdamW."""

    def __init__(self, name: str, module: nn.Module, tokenizer: nn.Module, cfg: SpadSize, batch: dict) -> None:
        from medfm.engines.spad_mim import SpadMIMPrepareBatch
        from medfm.losses.soft_ce import SoftTokenCELoss

        self.name = name
        self.module = module.train()
        self.prepare = SpadMIMPrepareBatch(tokenizer, mask_ratio=cfg.mask_ratio, seed=0)
        self.loss_fn = SoftTokenCELoss()
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, weight_decay=0.05, fused=FUSED_ADAMW)
        self.batch = batch
        self.spad = name == "spad_vit"

    def loss(self) -> torch.Tensor:
        image, targets, _, kwargs = self.prepare(self.batch, self.device)
        preds = self.module(image, **kwargs) if self.spad else self.module(image, kwargs["mask"])
        return self.loss_fn.forward_terms(preds, targets)["loss"]


def _run_spad(args: argparse.Namespace) -> int:
    from medfm.networks.nets.spad_vit import SpadViTMIM
    from medfm.networks.nets.spad_vt import SpadVT

    cfg = SPAD_SIZES[args.size]
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        raise SystemExit("--steps must be >= 1, --warmup >= 0 and --batch >= 1.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    b = args.batch
    start = time.perf_counter()
    _note(f"spad --size {args.size}: batch {b}, input {[b, 3, *cfg.spatial]}, warm-up {args.warmup}, "
          f"steps {args.steps}, {threads} threads, torch {torch.__version__}, load average {_loadavg()}")  # fmt: skip
    torch.manual_seed(0)
    fp32_start = _matmul_sweep(cfg.matmul_sizes, torch.float32, cfg.matmul_repeats)
    tokenizer = SpadVT(channels=cfg.tok_channels, num_codes=cfg.codes, code_dim=cfg.code_dim).eval()
    batch = {"image": torch.rand(b, 3, *cfg.spatial), "aniso_d": torch.zeros(b, dtype=torch.long)}
    trainees = [
        SpadMIMTrainee("monai_vit", MimHeadViT(cfg), tokenizer, cfg, batch),
        SpadMIMTrainee(
            "spad_vit",
            SpadViTMIM(num_codes=cfg.codes, hidden_size=cfg.hidden, num_layers=cfg.layers, num_heads=cfg.heads,
                       mlp_dim=cfg.mlp, pos_embed_shape=cfg.tokens),
            tokenizer, cfg, batch,
        ),
    ]  # fmt: skip
    flops = {}
    for t in trainees:
        _note(f"{t.name}: {_params(t.module) / 1e6:.1f} M parameters; counting FLOPs on one untimed step")
        flops[t.name] = t.count_flops()
        _note(f"  {flops[t.name]['flops_per_step'] / 1e9:.2f} GFLOP per step")
    runners = {t.name: t.step for t in trainees}
    warmups = {n: max(0, args.warmup - 1) for n in runners}
    samples, all_samples, rounds, clean = _time_rounds(runners, warmups, args.steps, cfg.extra_rounds_after_s)
    rec, peak32, _ = _matmul_peak_record(fp32_start, {}, cfg.matmul_repeats)
    _emit({"case": "matmul_peak", "size": args.size, "threads": threads, "sizes": list(cfg.matmul_sizes),
           "repeats": cfg.matmul_repeats} | rec)  # fmt: skip
    model = {"tokens": list(cfg.tokens), "encoder": [cfg.hidden, cfg.layers, cfg.heads], "mask_ratio": cfg.mask_ratio,
             "tokenizer": {"channels": list(cfg.tok_channels), "codes": [cfg.codes, cfg.code_dim]}}  # fmt: skip
    mlps = {"monai_vit": f"GELU {cfg.mlp * 3 // 2}", "spad_vit": f"SwiGLU {cfg.mlp} + inner LayerNorm, 3D RoPE"}
    results = _step_records(
        list(runners), samples, all_samples, rounds, clean, flops, dict.fromkeys(runners, peak32),
        lambda n: {"case": n, "size": args.size, "batch": b, "input": [b, 3, *cfg.spatial], "threads": threads,
                   "params": _params(next(t.module for t in trainees if t.name == n)),
                   "model": model | {"mlp": mlps[n]}},
    )  # fmt: skip
    mo, sp = results["monai_vit"], results["spad_vit"]
    if mo["mfu"] and sp["mfu"]:
        sp |= {"ratio_vs_monai": _r(sp["mfu"] / mo["mfu"]), "step_ratio_vs_monai": _r(sp["step_s"] / mo["step_s"]),
               "flops_ratio_vs_monai": _r(sp["flops_per_step"] / mo["flops_per_step"])}  # fmt: skip
    for n in ("monai_vit", "spad_vit"):
        _emit(results[n])
    if args.profile:
        for t in trainees:
            _profile(t)
    if args.data:
        del trainees, runners
        gc.collect()
        for rec in _run_spad_data(args, cfg, b / sp["step_s"]):
            _emit(rec)
    _note(f"done in {time.perf_counter() - start:.1f} s; load average {_loadavg()}")
    return 0


def _run_spad_data(args: argparse.Namespace, cfg: SpadSize, train_rate: float) -> list[dict[str, Any]]:
    """The MIM training pipeline of bundles/spad_vit/configs/train.json on synthetic 2D and 3D images."""
    from monai.bundle import ConfigParser
    from monai.data import Dataset, PersistentDataset
    from monai.transforms import Compose

    from medfm.data import build_spad_datalist, generate_synthetic_spad

    parser = ConfigParser(globals={"medfm": "medfm"})
    parser.read_config(str(SPAD_TRAIN_CONFIG))
    parser["crop_tokens"] = list(cfg.tokens)
    transforms = parser.get_parsed_content("train#deterministic_transforms")
    random = parser.get_parsed_content("train#random_transforms")
    records = []
    with tempfile.TemporaryDirectory(prefix="medfm_bench_") as tmp:
        data_dir = os.path.join(tmp, "data")
        t0 = time.perf_counter()
        generate_synthetic_spad(data_dir, num_2d=cfg.data_2d, num_3d=cfg.data_3d, size_2d=cfg.data_size_2d,
                                size_3d=cfg.data_size_3d)  # fmt: skip
        datalist = build_spad_datalist(data_dir)
        _note(f"data: {len(datalist)} synthetic images ({cfg.data_size_2d}^2 PNG, {cfg.data_size_3d}^2 x "
              f"slices NIfTI) written in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        full = Compose(transforms + random)
        common = {"size": args.size, "images": len(datalist),
                  "pipeline": [type(t).__name__ for t in transforms + random], "train_samples_per_s": _r(train_rate),
                  "target": DATA_TARGET}  # fmt: skip
        for case, ds in (
            ("data_cold", Dataset(datalist, transform=full)),
            ("data_warm", PersistentDataset(datalist, transform=full, cache_dir=os.path.join(tmp, "cache"))),
        ):
            fill = [_timed(lambda i=i, ds=ds: ds[i]) for i in range(len(ds))]  # first pass: imports, cache fill
            samples = [_timed(lambda i=i, ds=ds: ds[i]) for _ in range(2) for i in range(len(ds))]
            rate = len(samples) / sum(x.wall_s for x in samples)
            records.append({"case": case, **common, "samples": len(samples), "samples_per_s": _r(rate),
                            "ratio_vs_train": _r(rate / train_rate), "meets_target": rate / train_rate >= DATA_TARGET,
                            "first_pass_s": _r(sum(x.wall_s for x in fill))})  # fmt: skip
            _note(f"{case}: {records[-1]['samples_per_s']} samples/s")
    return records


def _add_spad(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("spad", help="SPAD-ViT's MIM step vs MONAI's ViT of the same size")
    p.add_argument("--size", choices=sorted(SPAD_SIZES), default="base", help="model size (default base)")
    _add_step_options(p, "batch size")
    p.add_argument("--data", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the data pipeline (default on)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed rounds, profile one step per model (phases, top ops) to stderr")  # fmt: skip
    p.set_defaults(func=_run_spad)
