"""``bench.py fratmae``: FratMAE vs MONAI's MaskedAutoEncoderViT, bf16 and the data pipeline.

``fratmae`` cases, in the order printed:

``matmul_peak``
    This machine's dense matmul throughput: square ``n x n`` matmuls (base: n = 2048, 3072, 4096), each
    timed ``repeats`` times after one untimed call; the best GFLOP/s over sizes and repeats. Measured at the
    start and again (best size only) after the model steps; the peak is the best of both, so MFUs are
    relative to what the machine did at its best moment in this run. ``bf16_gflops`` with ``--bf16``.
``monai_mae``
    Two ``monai.networks.nets.MaskedAutoEncoderViT`` (one per modality): encoder as ours (768/12/12/3072,
    qkv bias on, as in our encoders), decoder 512/8/16/2048 -- MONAI's API takes every one of our decoder
    sizes; what it cannot express is the cross-attention sub-layer (its decoders attend to themselves only),
    so this is the plain per-modality MAE of the paper's ablation. Its decoder position embedding is
    ``learnable``: MONAI's 3D sin-cos embedding needs a width divisible by 6, which 512 is not (same FLOPs).
    Both modalities are masked (MONAI masks inside ``forward``, ratio 0.5). One step: forward both, MSE on
    the masked patches, backward, AdamW. Needs ``einops`` (MONAI's attention block imports it); without it
    this case is left out.
``fratmae``
    ``medfm.networks.nets.FratMAE`` (cross_modal=True, context_align=True, paper sizes), a batch prepared by
    ``medfm.engines.FratMAEPretrainPrepareBatch`` each step (mask drawn each step), ``FratMAELoss.forward_terms``,
    backward, AdamW. ``ratio_vs_monai`` = this MFU / MONAI's MFU; ``step_ratio_vs_monai`` = step times.
``fratmae_bf16`` (``--bf16``)
    The same step with the forward under ``torch.autocast(<device>, bfloat16)`` and the loss outside it, as
    ``medfm.engines.TrainingIteration(bf16=True)`` does; ``speedup_vs_fp32``; ``mfu`` against the bf16 matmul peak.
``data_cold`` / ``data_warm`` (``--data``)
    The training data pipeline of ``bundles/fratmae_petct/configs/train.json`` (parsed from that file, so it
    is exactly the bundle's: LoadPETCTd, Orientationd RAS, Resized, ScaleIntensityRanged CT / PET,
    TokenizePromptd, SelectItemsd, RandStackCropd) on synthetic whole-body cases written by
    ``medfm.data.generate_synthetic_petct`` into a temporary folder. Cold: the whole chain from the NIfTI
    files (``monai.data.Dataset``); warm: ``monai.data.PersistentDataset`` with its cache filled (cache read +
    the random crop per sample). Both a plain single-process loop. ``ratio_vs_train`` = samples/s delivered
    / samples/s the fp32 FratMAE step consumes (batch / step_s); the target is >= 2 (``meets_target``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .harness import (
    DATA_TARGET,
    FRATMAE_TRAIN_CONFIG,
    FUSED_ADAMW,
    Sample,
    Trainee,
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
# FratMAE


@dataclass(frozen=True)
class FratMAESize:
    """Model and data sizes of one ``--size``."""

    spatial: tuple[int, int, int]  # model input (X, Y, Z) = the crop
    patch: int
    hidden: int
    layers: int
    heads: int
    mlp: int
    dec_hidden: int
    dec_layers: int
    dec_heads: int
    dec_mlp: int
    text_width: int
    text_layers: int
    text_heads: int
    embed_dim: int
    mask_ratio: float
    whole_body: tuple[int, int, int]  # Resized target of the data pipeline
    data_shape: tuple[int, int, int]  # synthetic case grid
    data_spacing: tuple[float, float, float]
    data_cases: int
    matmul_sizes: tuple[int, ...]
    matmul_repeats: int
    extra_rounds_after_s: float  # no extra timed rounds once the timed phase has run this long


FRATMAE_SIZES = {
    # the paper's defaults (train.json): ViT-B encoders, MAE decoders, CLIP-B-sized text encoder, coronal
    # stacks of 160 x 32 x 192. Synthetic cases on a 200 x 200 x 326 grid at 4 x 4 x 3 mm (80 x 80 x 98 cm):
    # AutoPET's PET has 326 slices of 3 mm in a typical whole-body scan on a 400 x 400 in-plane grid of
    # 2 mm; half that in-plane size keeps the generator quick while the loader still reads ~13 M voxels per
    # modality and Resized still shrinks every axis.
    "base": FratMAESize(
        spatial=(160, 32, 192), patch=16, hidden=768, layers=12, heads=12, mlp=3072,
        dec_hidden=512, dec_layers=8, dec_heads=16, dec_mlp=2048,
        text_width=512, text_layers=12, text_heads=8, embed_dim=512, mask_ratio=0.5,
        whole_body=(160, 160, 192), data_shape=(200, 200, 326), data_spacing=(4.0, 4.0, 3.0), data_cases=3,
        matmul_sizes=(2048, 3072, 4096), matmul_repeats=3, extra_rounds_after_s=90.0,
    ),
    # a few seconds: 8 x 2 x 8 = 128 tokens of width 48, so attention is a large share of the FLOPs (a
    # missing attention count shows); the same pipeline on a 64^3 whole-body grid.
    "tiny": FratMAESize(
        spatial=(64, 16, 64), patch=8, hidden=48, layers=2, heads=3, mlp=192,
        dec_hidden=32, dec_layers=2, dec_heads=2, dec_mlp=128,
        text_width=32, text_layers=2, text_heads=2, embed_dim=32, mask_ratio=0.5,
        whole_body=(64, 64, 64), data_shape=(48, 48, 96), data_spacing=(10.0, 10.0, 20.0), data_cases=2,
        matmul_sizes=(256, 512), matmul_repeats=3, extra_rounds_after_s=5.0,
    ),
}  # fmt: skip
DEFAULT_STEPS = {"base": (1, 3), "tiny": (1, 3)}  # (warmup, timed steps)


def _prompt_ids(batch: int, context_length: int) -> tuple[torch.Tensor, Any]:
    from medfm.transforms import PromptTokenizer, build_prompt

    tok = PromptTokenizer(context_length=context_length)
    prompts = [build_prompt("FDG", "melanoma", 61, "M"), build_prompt("PSMA", "prostate cancer", 70, "M")]
    return tok([prompts[i % len(prompts)] for i in range(batch)]), tok


class FratMAETrainee(Trainee):
    def __init__(self, cfg: FratMAESize, batch: dict[str, torch.Tensor], tokenizer: Any, bf16: bool = False):
        from medfm.engines import FratMAEPretrainPrepareBatch
        from medfm.losses import FratMAELoss
        from medfm.networks.nets import FratMAE

        self.name = "fratmae"
        self.module = FratMAE(
            in_channels=1, patch_size=cfg.patch, hidden_size=cfg.hidden, num_layers=cfg.layers,
            num_heads=cfg.heads, mlp_dim=cfg.mlp, decoder_hidden_size=cfg.dec_hidden,
            decoder_num_layers=cfg.dec_layers, decoder_num_heads=cfg.dec_heads, decoder_mlp_dim=cfg.dec_mlp,
            cross_modal=True, context_align=True, text_vocab_size=tokenizer.vocab_size,
            text_eot_id=tokenizer.eot_id, text_context_length=tokenizer.context_length,
            text_width=cfg.text_width, text_num_layers=cfg.text_layers, text_num_heads=cfg.text_heads,
            embed_dim=cfg.embed_dim,
        )  # fmt: skip
        self.module.train()
        self.prepare = FratMAEPretrainPrepareBatch(cfg.patch, mask_ratio=cfg.mask_ratio, cross_modal=True, seed=0)
        self.loss_fn = FratMAELoss(infonce_weight=1.0, temperature=0.07)
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-4, weight_decay=0.05, fused=FUSED_ADAMW)
        self.batch = batch
        self.bf16 = bf16

    def loss(self) -> torch.Tensor:
        inputs, targets, args, kwargs = self.prepare(self.batch, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            preds = self.module(inputs, *args, **kwargs)
        return self.loss_fn.forward_terms(preds, targets)["loss"]


class MonaiMAEPair(nn.Module):
    """Two MONAI MaskedAutoEncoderViT, one per modality (a named container, for per-module FLOPs)."""

    def __init__(self, cfg: FratMAESize) -> None:
        super().__init__()
        from monai.networks.nets import MaskedAutoEncoderViT

        self.nets = nn.ModuleDict(
            {
                m: MaskedAutoEncoderViT(
                    in_channels=1,
                    img_size=cfg.spatial,
                    patch_size=cfg.patch,
                    hidden_size=cfg.hidden,
                    mlp_dim=cfg.mlp,
                    num_layers=cfg.layers,
                    num_heads=cfg.heads,
                    masking_ratio=cfg.mask_ratio,
                    decoder_hidden_size=cfg.dec_hidden,
                    decoder_mlp_dim=cfg.dec_mlp,
                    decoder_num_layers=cfg.dec_layers,
                    decoder_num_heads=cfg.dec_heads,
                    proj_type="conv",
                    pos_embed_type="sincos",
                    decoder_pos_embed_type="learnable",
                    spatial_dims=3,
                    qkv_bias=True,
                )  # fmt: skip
                for m in ("pet", "ct")
            }
        )

    def forward(self, images: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{m: (pred (B, N, P), mask (B, N), 1 = masked)}``; MONAI draws each mask inside ``forward``."""
        return {m: net(images[m]) for m, net in self.nets.items()}


class MonaiMAETrainee(Trainee):
    def __init__(self, cfg: FratMAESize, batch: dict[str, torch.Tensor]) -> None:
        self.name = "monai_mae"
        self.module = MonaiMAEPair(cfg)
        self.module.train()
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-4, weight_decay=0.05, fused=FUSED_ADAMW)
        self.batch = batch
        self.patch = (cfg.patch,) * 3

    def loss(self) -> torch.Tensor:
        from medfm.networks.blocks import (
            patchify,  # raster token order, as MONAI's conv patch embedding
        )

        total = torch.zeros((), device=self.device)
        for m, (pred, mask) in self.module(self.batch).items():
            target = patchify(self.batch[m], self.patch)
            w = mask.to(pred.dtype)
            total = total + (((pred - target) ** 2).mean(dim=-1) * w).sum() / w.sum()
        return total


def _model_record(case: str, size: str, batch: int, cfg: FratMAESize, threads: int) -> dict[str, Any]:
    return {"case": case, "size": size, "batch": batch, "input": [batch, 1, *cfg.spatial], "threads": threads}


def _fratmae_config_fields(cfg: FratMAESize) -> dict[str, Any]:
    grid = [s // cfg.patch for s in cfg.spatial]
    n = grid[0] * grid[1] * grid[2]
    return {
        "patch": cfg.patch, "tokens": n, "visible_tokens": max(1, int(round(n * (1 - cfg.mask_ratio)))),
        "encoder": [cfg.hidden, cfg.layers, cfg.heads, cfg.mlp],
        "decoder": [cfg.dec_hidden, cfg.dec_layers, cfg.dec_heads, cfg.dec_mlp],
        "text": [cfg.text_width, cfg.text_layers, cfg.text_heads, 4 * cfg.text_width], "embed_dim": cfg.embed_dim,
        "mask_ratio": cfg.mask_ratio,
    }  # fmt: skip


def _run_models(
    args: argparse.Namespace, cfg: FratMAESize, threads: int
) -> tuple[list[dict[str, Any]], tuple[float, float | None]]:
    """matmul_peak, monai_mae, fratmae (and fratmae_bf16) records; the fp32 and bf16 FratMAE step times."""
    warmup, steps = args.warmup, args.steps
    b = args.batch
    torch.manual_seed(0)

    # --- matmul peak, start of run
    dtypes = "fp32, bf16" if args.bf16 else "fp32"
    _note(f"matmul peak: sizes {cfg.matmul_sizes}, {cfg.matmul_repeats} repeats ({dtypes})")
    fp32_start = _matmul_sweep(cfg.matmul_sizes, torch.float32, cfg.matmul_repeats)
    bf16_start = _matmul_sweep(cfg.matmul_sizes, torch.bfloat16, cfg.matmul_repeats) if args.bf16 else {}

    # --- models on one shared synthetic batch (images in [0, 1] as after the pipeline's intensity scaling)
    prompt_ids, tokenizer = _prompt_ids(b, 32)
    batch = {
        "pet": torch.rand(b, 1, *cfg.spatial),
        "ct": torch.rand(b, 1, *cfg.spatial),
        "prompt_ids": prompt_ids,
    }
    trainees: list[Trainee] = []
    try:
        import einops  # noqa: F401  (MONAI's MaskedAutoEncoderViT needs it)

        trainees.append(MonaiMAETrainee(cfg, batch))
    except ImportError:
        _note("einops is not installed: MONAI's MaskedAutoEncoderViT cannot be built; monai_mae is skipped")
    fr = FratMAETrainee(cfg, batch, tokenizer, bf16=False)
    trainees.append(fr)
    by_name = {t.name: t for t in trainees}
    runners: dict[str, Callable[[], None]] = {t.name: t.step for t in trainees}
    if args.bf16:
        fr_bf16 = copy.copy(fr)  # the same model, optimiser and batch; the forward autocast
        fr_bf16.bf16 = True
        fr_bf16.name = "fratmae_bf16"
        runners["fratmae_bf16"] = fr_bf16.step

    flops: dict[str, dict[str, Any]] = {}
    for t in trainees:
        _note(f"{t.name}: {_params(t.module) / 1e6:.1f} M parameters; counting FLOPs on one untimed step")
        t0 = time.perf_counter()
        flops[t.name] = t.count_flops()
        _note(f"  {flops[t.name]['flops_per_step'] / 1e9:.1f} GFLOP per step ({time.perf_counter() - t0:.1f} s)")
    if "fratmae_bf16" in runners:
        flops["fratmae_bf16"] = flops["fratmae"]

    names = list(runners)
    # the FLOP-counting step was the first warm-up step of monai_mae and fratmae (allocations, optimiser
    # state); the bf16 step warms its own kernels
    warmups = {n: warmup if n == "fratmae_bf16" else max(0, warmup - 1) for n in names}
    samples, all_samples, rounds, clean = _time_rounds(runners, warmups, steps, cfg.extra_rounds_after_s)

    # --- matmul peak again at the best size, after the steps
    rec, peak32, peak16 = _matmul_peak_record(fp32_start, bf16_start, cfg.matmul_repeats)
    records = [{"case": "matmul_peak", "size": args.size, "threads": threads, "sizes": list(cfg.matmul_sizes),
                "repeats": cfg.matmul_repeats} | rec]  # fmt: skip

    peaks = {n: peak16 if n == "fratmae_bf16" else peak32 for n in names}
    results = _step_records(
        names, samples, all_samples, rounds, clean, flops, peaks, lambda n: _model_record(n, args.size, b, cfg, threads)
    )
    if "monai_mae" in results:
        results["monai_mae"] |= {
            "params": _params(by_name["monai_mae"].module),
            "model": {**_fratmae_config_fields(cfg), "decoder_cross_attention": False, "masked": ["pet", "ct"],
                      "qkv_bias": True, "context_align": False},
        }  # fmt: skip
    fr_fields = {"params": _params(fr.module),
                 "model": {**_fratmae_config_fields(cfg), "decoder_cross_attention": True, "masked": "pet or ct",
                           "qkv_bias": True, "context_align": True}}  # fmt: skip
    results["fratmae"] |= fr_fields
    if "monai_mae" in results and results["monai_mae"]["mfu"] and results["fratmae"]["mfu"]:
        mo, fm = results["monai_mae"], results["fratmae"]
        fm |= {"ratio_vs_monai": _r(fm["mfu"] / mo["mfu"]), "step_ratio_vs_monai": _r(fm["step_s"] / mo["step_s"]),
               "flops_ratio_vs_monai": _r(fm["flops_per_step"] / mo["flops_per_step"])}  # fmt: skip
    if "fratmae_bf16" in results:
        bf = results["fratmae_bf16"]
        bf |= {"params": fr_fields["params"], "speedup_vs_fp32": _r(results["fratmae"]["step_s"] / bf["step_s"]),
               "mfu_vs_fp32_peak": _r(bf["gflops"] / peak32) if bf["gflops"] else None}  # fmt: skip
    records += [results[n] for n in ("monai_mae", "fratmae", "fratmae_bf16") if n in results]

    train_step = results["fratmae"]["step_s"]
    bf16_step = results.get("fratmae_bf16", {}).get("step_s")
    if args.profile:
        for t in [*trainees, *([fr_bf16] if args.bf16 else [])]:
            _profile(t)
    del trainees, by_name, runners, fr, batch  # free the models before the data pipeline runs
    if args.bf16:
        del fr_bf16
    gc.collect()
    return records, (train_step, bf16_step)


def _fratmae_pipeline(cfg: FratMAESize) -> tuple[Any, list[str]]:
    """The training pipeline of train.json (deterministic + random transforms), sized for ``cfg``."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser(globals={"medfm": "medfm"})
    parser.read_config(str(FRATMAE_TRAIN_CONFIG))
    # size the crop through whichever knob the config has (an explicit roi_size, or the stack preset's
    # slice count along the coronal stack axis); the output shape is checked on the first sample
    parser["whole_body_size"] = list(cfg.whole_body)
    if parser.get("roi_size") is not None:
        parser["roi_size"] = list(cfg.spatial)
    elif parser.get("stack_slices") is not None:
        parser["stack_slices"] = cfg.spatial[1]
    transforms = parser.get_parsed_content("train#deterministic_transforms") + parser.get_parsed_content(
        "train#random_transforms"
    )
    return Compose(transforms), [type(t).__name__ for t in transforms]


def _run_data(args: argparse.Namespace, cfg: FratMAESize, train_step: float, bf16_step: float | None) -> list[dict]:
    from monai.data import Dataset, PersistentDataset

    from medfm.data import build_autopet_datalist, generate_synthetic_petct

    b = args.batch
    train_rate = b / train_step
    records = []
    with tempfile.TemporaryDirectory(prefix="medfm_bench_") as tmp:
        data_dir = os.path.join(tmp, "data")
        t0 = time.perf_counter()
        generate_synthetic_petct(data_dir, num_cases=cfg.data_cases, shape=cfg.data_shape, spacing=cfg.data_spacing)
        _note(f"data: {cfg.data_cases} synthetic cases {cfg.data_shape} at {cfg.data_spacing} mm written in "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        datalist = build_autopet_datalist(data_dir)
        transform, names = _fratmae_pipeline(cfg)
        common = {"size": args.size, "batch": b, "input": [b, 1, *cfg.spatial], "grid": list(cfg.data_shape),
                  "spacing": list(cfg.data_spacing), "cases": len(datalist), "pipeline": names,
                  "train_samples_per_s": _r(train_rate), "target": DATA_TARGET}  # fmt: skip

        def rate_record(case: str, samples: list[Sample], extra: dict[str, Any]) -> dict[str, Any]:
            total = sum(s.wall_s for s in samples)
            rate = len(samples) / total
            ratio = rate / train_rate
            rec = {"case": case, **common, "samples": len(samples), "samples_per_s": _r(rate),
                   "sample_s": _r(statistics.median(s.wall_s for s in samples)),
                   "ratio_vs_train": _r(ratio), "meets_target": ratio >= DATA_TARGET}  # fmt: skip
            if bf16_step:
                rec["ratio_vs_train_bf16"] = _r(rate / (b / bf16_step))
            foreign = [s.foreign_cpu for s in samples if s.foreign_cpu is not None]
            rec["foreign_cpu"] = _r(statistics.median(foreign), 2) if foreign else None
            return rec | extra

        passes_cold, passes_warm = 2, 5
        cold = Dataset(datalist, transform=transform)
        first = cold[0]  # imports and first-call costs, and the check that the pipeline fits the model
        for key in ("pet", "ct"):
            if tuple(first[key].shape[1:]) != cfg.spatial:
                raise RuntimeError(
                    f"the train.json pipeline gives {key} crops of {tuple(first[key].shape)}, the model takes "
                    f"{cfg.spatial}: adapt _fratmae_pipeline to the config."
                )
        samples = [_timed(lambda i=i: cold[i]) for _ in range(passes_cold) for i in range(len(cold))]
        records.append(rate_record("data_cold", samples, {}))
        _note(f"data cold: {records[-1]['samples_per_s']} samples/s")

        warm = PersistentDataset(datalist, transform=transform, cache_dir=os.path.join(tmp, "cache"))
        fill = [_timed(lambda i=i: warm[i]) for i in range(len(warm))]
        samples = [_timed(lambda i=i: warm[i]) for _ in range(passes_warm) for i in range(len(warm))]
        records.append(rate_record("data_warm", samples, {"cache_fill_s": _r(sum(s.wall_s for s in fill))}))
        _note(f"data warm: {records[-1]['samples_per_s']} samples/s")
    return records


def _run_fratmae(args: argparse.Namespace) -> int:
    cfg = FRATMAE_SIZES[args.size]
    dw, ds = DEFAULT_STEPS[args.size]
    args.warmup = dw if args.warmup is None else args.warmup
    args.steps = ds if args.steps is None else args.steps
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        raise SystemExit("--steps must be >= 1, --warmup >= 0 and --batch >= 1.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    _note(f"fratmae --size {args.size}: batch {args.batch}, input {[args.batch, 1, *cfg.spatial]}, "
          f"warm-up {args.warmup}, steps {args.steps}, {threads} threads, torch {torch.__version__}, "
          f"load average {_loadavg()}")  # fmt: skip
    records, (train_step, bf16_step) = _run_models(args, cfg, threads)
    for rec in records:
        _emit(rec)
    if args.data:
        for rec in _run_data(args, cfg, train_step, bf16_step):
            _emit(rec)
    _note(f"done in {time.perf_counter() - start:.1f} s; load average {_loadavg()}")
    return 0


def _add_fratmae(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fratmae", help="FratMAE vs MONAI's MaskedAutoEncoderViT, bf16 and data pipeline")
    p.add_argument("--size", choices=sorted(FRATMAE_SIZES), default="base", help="model size (default base)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per model (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per model (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the bf16-autocast step (default on)")  # fmt: skip
    p.add_argument(
        "--data", action=argparse.BooleanOptionalAction, default=True, help="also time the data pipeline (default on)"
    )
    p.add_argument("--profile", action="store_true",
                   help="after the timed rounds, profile one step per model (phases, top ops) to stderr")  # fmt: skip
    p.set_defaults(func=_run_fratmae)
