#!/usr/bin/env python
"""Throughput benchmarks of medfm's models against the MONAI model a user would pick instead.

Usage::

    python tools/bench.py fratmae [--size base|tiny] [--batch 2] [--steps N] [--warmup W] [--threads T]
                                  [--bf16/--no-bf16] [--data/--no-data]
    python tools/bench.py spad [--size base|tiny] [--batch 2] [--steps N] [--data/--no-data]
    python tools/bench.py panfm [--size base|tiny] [--batch 4] [--pool 16] [--buckets K] [--rates 0 0.2 0.4 0.6]
    python tools/bench.py panfm-eval [--subjects 32 128] [--batch 8]
    python tools/bench.py midol [--size base|tiny] [--batch 2] [--steps N] [--data/--no-data] [--workers 0 2]
    python tools/bench.py crop-cache [--shape 400 400 326] [--roi 160 32 192] [--samples 20]
    python tools/bench.py data [--cases 3] [--shape 400 400 326] [--workers 0 2 4] [--epochs 2]
    python tools/bench.py gpu [--device cuda] [--models fratmae spad midol] [--batch 16] [--bf16] [--compile]

One subcommand per model; add a ``_add_<model>`` parser builder and register it in ``_SUBCOMMANDS``.
Everything runs in one process; stdout carries exactly one JSON object per case, human notes go to stderr.

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
    ``medfm.engines.FratMAEPrepareBatch`` each step (mask drawn each step), ``FratMAELoss.forward_terms``,
    backward, AdamW. ``ratio_vs_monai`` = this MFU / MONAI's MFU; ``step_ratio_vs_monai`` = step times.
``fratmae_bf16`` (``--bf16``)
    The same step with the forward under ``torch.autocast(<device>, bfloat16)`` and the loss outside it, as
    ``medfm.engines.SSLIteration(bf16=True)`` does; ``speedup_vs_fp32``; ``mfu`` against the bf16 matmul peak.
``data_cold`` / ``data_warm`` (``--data``)
    The training data pipeline of ``bundles/fratmae_petct/configs/train.json`` (parsed from that file, so it
    is exactly the bundle's: LoadPETCTd, Orientationd RAS, Resized, ScaleIntensityRanged CT / PET,
    TokenizePromptd, SelectItemsd, RandStackCropd) on synthetic whole-body cases written by
    ``medfm.data.generate_synthetic_petct`` into a temporary folder. Cold: the whole chain from the NIfTI
    files (``monai.data.Dataset``); warm: ``monai.data.PersistentDataset`` with its cache filled (cache read +
    the random crop per sample). Both a plain single-process loop. ``ratio_vs_train`` = samples/s delivered
    / samples/s the fp32 FratMAE step consumes (batch / step_s); the target is >= 2 (``meets_target``).

Timing: the model steps are interleaved (one step of each model per round, the order rotated each round)
so that all see the same machine, after ``--warmup`` untimed steps each (the FLOP-counting step below is the
first of them for the fp32 steps). Each step records its wall time, its process CPU time and ``foreign_cpu``:
the share of the machine's CPU time that other processes used meanwhile (from /proc/stat; null elsewhere).
On a small shared machine that matters a lot: with every core in use by torch's threads, a second busy
process slows a step many times over, not by its share of the CPU. A round is quiet when every step in it
saw ``foreign_cpu <= 0.10``; up to ``--steps`` extra rounds are run in place of rounds that were not (while
time allows), and ``step_s`` is the median over the quiet rounds (over all rounds, with a warning, if none
was quiet). ``step_s_all`` / ``foreign_cpu_all`` list every round, ``rounds`` / ``quiet_rounds`` count them.

FLOPs: counted once per model with ``torch.utils.flop_counter.FlopCounterMode`` on one extra, untimed step
(forward and backward counted separately; the optimizer does no matmuls). PyTorch's counter has no formula
for the CPU flash-attention kernels that ``F.scaled_dot_product_attention`` runs on on CPU, so without help it
silently counts no attention FLOPs for medfm's models (MONAI's explicit einsum attention is counted). This
tool registers them: forward 2 batched matmuls (QK^T, AV), backward 4 (the gradients of both) -- model FLOPs,
the kernel's recomputation of QK^T in the backward is not counted, matching what an explicit attention's
autograd does. Attention with a causal mask is counted as full (as PyTorch's formulas do).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
FRATMAE_TRAIN_CONFIG = REPO_ROOT / "bundles" / "fratmae_petct" / "configs" / "train.json"
SPAD_TRAIN_CONFIG = REPO_ROOT / "bundles" / "spad_vit" / "configs" / "train.json"
MIDOL_TRAIN_CONFIG = REPO_ROOT / "bundles" / "midol_multimodal" / "configs" / "train.json"
PANFM_TRAIN_CONFIG = REPO_ROOT / "bundles" / "panfm_panorgan" / "configs" / "train.json"
_PANFM_SUBJECT_VOXELS = 2_174_976  # voxels of one subject with every organ at train.json's grids
FUSED_ADAMW = True  # as the bundle configs set it; both models get the same optimizer
DATA_TARGET = 2.0
H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM, dense bf16 tensor-core peak (datasheet)
GPU_MFU_ASSUMED = 0.4  # what a GPU step is assumed to reach when estimating how fast it consumes samples  # the data pipeline should deliver at least this many times what training consumes

_STDOUT = sys.stdout  # JSON lines only; everything else (ours and libraries') goes to stderr


def _emit(record: dict[str, Any]) -> None:
    _STDOUT.write(json.dumps(record) + "\n")
    _STDOUT.flush()


def _note(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else float(f"{x:.{nd}g}")


# ----------------------------------------------------------------------------------------------------------
# timing helpers


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of this machine spent busy since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    busy = sum(vals) - vals[3] - vals[4]
    return busy / os.sysconf("SC_CLK_TCK")


QUIET = 0.10  # a timed round counts when other processes used at most this share of the machine's CPU


@dataclass
class Sample:
    wall_s: float
    cpu_s: float
    foreign_cpu: float | None


def _timed(fn: Callable[[], Any]) -> Sample:
    busy0, cpu0, t0 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
    fn()
    t1, cpu1, busy1 = time.perf_counter(), time.process_time(), _busy_cpu_seconds()
    wall, cpu = t1 - t0, cpu1 - cpu0
    foreign = None
    if busy0 is not None and busy1 is not None and wall > 0:
        # /proc/stat ticks at 100 Hz: over short steps this is coarse, so clamp to [0, 1]
        foreign = min(1.0, max(0.0, (busy1 - busy0 - cpu) / (wall * (os.cpu_count() or 1))))
    return Sample(wall, cpu, foreign)


def _is_quiet(rnd: dict[str, Sample]) -> bool:
    return all(s.foreign_cpu is None or s.foreign_cpu <= QUIET for s in rnd.values())


def _summary(samples: Sequence[Sample]) -> dict[str, Any]:
    walls = [s.wall_s for s in samples]
    foreign = [s.foreign_cpu for s in samples if s.foreign_cpu is not None]
    return {
        "step_s": _r(statistics.median(walls)),
        "step_s_min": _r(min(walls)),
        "step_s_all": [_r(w) for w in walls],
        "cpu_s": _r(statistics.median(s.cpu_s for s in samples)),
        "foreign_cpu": _r(statistics.median(foreign), 2) if foreign else None,
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------------
# matmul peak


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing on an accelerator); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_gflops(n: int, dtype: torch.dtype, repeats: int, device: torch.device = torch.device("cpu")) -> list[float]:
    """GFLOP/s of ``repeats`` timed ``n x n @ n x n`` products on ``device`` (after one untimed call)."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    torch.mm(a, b, out=out)
    _sync(device)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        rates.append(2.0 * n**3 / (time.perf_counter() - t0) / 1e9)
    return rates


def _matmul_sweep(
    sizes: Sequence[int], dtype: torch.dtype, repeats: int, device: torch.device = torch.device("cpu")
) -> dict[int, list[float]]:
    return {n: _matmul_gflops(n, dtype, repeats, device) for n in sizes}


# ----------------------------------------------------------------------------------------------------------
# FLOP counting


def _sdpa_cpu_flop_mapping() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode formulas for the CPU flash-attention ops (absent from PyTorch's registry)."""
    from torch.utils.flop_counter import sdpa_flop_count

    aten = torch.ops.aten

    def fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)  # QK^T and AV

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return 2 * sdpa_flop_count(query, key, value)  # dV, dP, dQ, dK; no recomputation of QK^T

    mapping: dict[Any, Callable[..., int]] = {}
    for name, fn in (
        ("_scaled_dot_product_flash_attention_for_cpu", fwd),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd),
    ):
        op = getattr(aten, name, None)
        if op is not None:
            mapping[op] = fn
    return mapping


def _flops_under(counts: dict[str, dict[Any, int]], prefix: str, module: nn.Module) -> int:
    """FLOPs attributed to ``module`` (named ``prefix``); a module entered through a method other than
    ``forward`` (e.g. ``encoder.forward_intermediates``) has no entry of its own: sum its children."""
    if prefix in counts:
        return int(sum(counts[prefix].values()))
    return sum(_flops_under(counts, f"{prefix}.{n}", c) for n, c in module.named_children())


def _component_names(module: nn.Module) -> list[str]:
    """Top-level parts of a model: its children, one level deeper for ModuleDict children."""
    names = []
    for name, child in module.named_children():
        if isinstance(child, nn.ModuleDict):
            names += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            names.append(name)
    return names


class Trainee:
    """One model's training step, split so that FLOPs can be counted (and time profiled) per phase.

    ``device`` is where the step runs (see ``gpu``); ``autocast_bf16`` runs batch preparation, forward and loss
    under ``torch.autocast(bfloat16)`` (a trainee with its own bf16 switch, such as FratMAE's, keeps it off)."""

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device = torch.device("cpu")
    autocast_bf16: bool = False

    def loss(self) -> torch.Tensor:
        """Prepare the batch, forward, loss."""
        raise NotImplementedError

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16):
            loss = self.loss()
        loss.backward()
        self.optimizer.step()

    def labelled_step(self) -> None:
        """``step`` with each phase labelled for torch.profiler."""
        from torch.profiler import record_function

        self.optimizer.zero_grad(set_to_none=True)
        with record_function("phase: batch + forward + loss"):
            loss = self.loss()
        with record_function("phase: backward"):
            loss.backward()
        with record_function("phase: optimizer"):
            self.optimizer.step()

    def count_flops(self) -> dict[str, Any]:
        """Run one step under FlopCounterMode; forward (+ loss) and backward counted separately."""
        from torch.utils.flop_counter import FlopCounterMode

        mapping = _sdpa_cpu_flop_mapping()
        self.optimizer.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False, custom_mapping=mapping) as fwd, torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16
        ):
            loss = self.loss()
        with FlopCounterMode(display=False, custom_mapping=mapping) as bwd:
            loss.backward()
        self.optimizer.step()
        counts = fwd.get_flop_counts()
        root = type(self.module).__name__
        by_module = {
            n: _flops_under(counts, f"{root}.{n}", self.module.get_submodule(n)) for n in _component_names(self.module)
        }
        attn_ops = set(mapping)
        attn = sum(v for k, v in fwd.get_flop_counts().get("Global", {}).items() if k in attn_ops)
        attn += sum(v for k, v in bwd.get_flop_counts().get("Global", {}).items() if k in attn_ops)
        return {
            "flops_per_step": int(fwd.get_total_flops() + bwd.get_total_flops()),
            "flops_fwd": int(fwd.get_total_flops()),
            "flops_bwd": int(bwd.get_total_flops()),
            "flops_sdpa_kernel": int(attn),
            "flops_fwd_by_module": {k: v for k, v in by_module.items() if v},
        }


def _profile(t: Trainee, top: int = 15) -> None:
    """One profiled step: time per phase and the ops with the most self time, to stderr."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        t.labelled_step()
        wall = time.perf_counter() - t0
    rows = [(e.key, e.cpu_time_total / 1e6, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    _note(f"profile {t.name}: one step {wall:.3f} s under the profiler")
    for key, total, _, _ in rows:
        if key.startswith("phase: "):
            _note(f"  {key[7:]:<58} {total:8.3f} s")
    for key, _, self_s, count in sorted((r for r in rows if not r[0].startswith("phase: ")), key=lambda r: -r[2])[:top]:
        _note(f"  {key[:50]:<50} x{count:<5} {self_s:8.3f} s self ({100 * self_s / wall:4.1f}%)")


def _matmul_peak_record(
    fp32_start: dict[int, list[float]], bf16_start: dict[int, list[float]], repeats: int,
    device: torch.device = torch.device("cpu"),
) -> tuple[dict[str, Any], float | None, float | None]:  # fmt: skip
    """Measure the best start size again (after the model steps) and return the peak fields, fp32 and bf16 peaks."""
    ends: dict[str, list[float]] = {}
    for tag, start, dtype in (("fp32", fp32_start, torch.float32), ("bf16", bf16_start, torch.bfloat16)):
        if start:
            best_n = max(start, key=lambda n, start=start: max(start[n]))
            ends[tag] = _matmul_gflops(best_n, dtype, repeats, device)
    rec: dict[str, Any] = {}
    peaks: dict[str, float | None] = {"fp32": None, "bf16": None}
    for tag, start in (("fp32", fp32_start), ("bf16", bf16_start)):
        if start:
            peak = peaks[tag] = max(max(v) for v in [*start.values(), ends[tag]])
            rec |= {
                f"{tag}_gflops": _r(peak),
                f"{tag}_gflops_start": _r(max(max(v) for v in start.values())),
                f"{tag}_gflops_end": _r(max(ends[tag])),
                f"{tag}_by_size": {str(n): _r(max(v)) for n, v in start.items()},
            }
    rec["loadavg"] = _loadavg()
    return rec, peaks["fp32"], peaks["bf16"]  # type: ignore[return-value]


def _time_rounds(
    runners: dict[str, Callable[[], None]], warmups: dict[str, int], steps: int, extra_rounds_after_s: float
) -> tuple[dict[str, list[Sample]], dict[str, list[Sample]], list[dict[str, Sample]], list[dict[str, Sample]]]:
    """Warm-up steps, then interleaved timed rounds (one step of each runner, order rotated each round), with
    extra rounds in place of those other processes slowed down (see the module docstring). Returns the samples
    used per runner (quiet rounds, or all), all samples per runner, all rounds and the quiet rounds."""
    names = list(runners)
    for name in names:
        for w in range(warmups.get(name, 0)):
            s = _timed(runners[name])
            _note(f"warm-up {w + 1} {name}: {s.wall_s:.3f} s")
    rounds: list[dict[str, Sample]] = []
    t_timed = time.perf_counter()
    while True:
        r = len(rounds)
        order = names[r % len(names) :] + names[: r % len(names)]
        rnd = {}
        for name in order:
            s = rnd[name] = _timed(runners[name])
            fc = "" if s.foreign_cpu is None else f", other processes {100 * s.foreign_cpu:.0f}% CPU"
            _note(f"round {r + 1} {name}: {s.wall_s:.3f} s (cpu {s.cpu_s:.2f} s{fc})")
        rounds.append(rnd)
        clean = [x for x in rounds if _is_quiet(x)]
        if len(rounds) < steps:
            continue
        if len(clean) >= steps or len(rounds) >= 2 * steps:
            break
        if time.perf_counter() - t_timed > extra_rounds_after_s:
            _note("no time left for more rounds in place of those that other processes slowed down")
            break
        _note(f"{len(rounds) - len(clean)} of {len(rounds)} rounds ran beside other busy processes: one more")
    clean = [x for x in rounds if _is_quiet(x)]
    used = clean if clean else rounds
    if not clean:
        _note("WARNING: every timed round ran beside other busy processes; step times are not this model's")
    samples = {n: [x[n] for x in used] for n in names}
    all_samples = {n: [x[n] for x in rounds] for n in names}
    return samples, all_samples, rounds, clean


def _step_records(
    names: Sequence[str], samples: dict[str, list[Sample]], all_samples: dict[str, list[Sample]],
    rounds: list, clean: list, flops: dict[str, dict[str, Any]], peaks: dict[str, float | None],
    base: Callable[[str], dict[str, Any]],
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """One record per runner: ``base(name)``, timing summary, FLOP counts, GFLOP/s and MFU vs ``peaks[name]``."""
    results = {}
    for name in names:
        summ = _summary(samples[name]) | {
            "step_s_all": [_r(x.wall_s) for x in all_samples[name]],
            "foreign_cpu_all": [None if x.foreign_cpu is None else _r(x.foreign_cpu, 2) for x in all_samples[name]],
            "rounds": len(rounds),
            "quiet_rounds": len(clean),
        }  # step_s etc. over the quiet rounds (all rounds if none was quiet); the *_all lists over all
        f = flops[name]
        step_s = summ["step_s"]
        gflops = f["flops_per_step"] / step_s / 1e9 if step_s else None
        peak = peaks[name]
        rec = base(name) | summ | dict(f)
        rec |= {"gflops": _r(gflops), "mfu": _r(gflops / peak) if gflops and peak else None}
        results[name] = rec
    return results


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
        matmul_sizes=(512, 1024), matmul_repeats=3, extra_rounds_after_s=5.0,
    ),
}  # fmt: skip
DEFAULT_STEPS = {"base": (1, 3), "tiny": (1, 3)}  # (warmup, timed steps)


def _prompt_ids(batch: int, context_length: int) -> tuple[torch.Tensor, Any]:
    from medfm.data import PromptTokenizer, build_prompt

    tok = PromptTokenizer(context_length=context_length)
    prompts = [build_prompt("FDG", "melanoma", 61, "M"), build_prompt("PSMA", "prostate cancer", 70, "M")]
    return tok([prompts[i % len(prompts)] for i in range(batch)]), tok


class FratMAETrainee(Trainee):
    def __init__(self, cfg: FratMAESize, batch: dict[str, torch.Tensor], tokenizer: Any, bf16: bool = False):
        from medfm.engines import FratMAEPrepareBatch
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
        self.prepare = FratMAEPrepareBatch(cfg.patch, mask_ratio=cfg.mask_ratio, cross_modal=True, seed=0)
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
        from medfm.networks.blocks import patchify  # raster token order, as MONAI's conv patch embedding

        total = torch.zeros((), device=self.device)
        for m, (pred, mask) in self.module(self.batch).items():
            target = patchify(self.batch[m], self.patch)
            w = mask.to(pred.dtype)
            total = total + (((pred - target) ** 2).mean(dim=-1) * w).sum() / w.sum()
        return total


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


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
    from medfm.data import build_autopet_datalist, generate_synthetic_petct
    from monai.data import Dataset, PersistentDataset

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
        common = {"size": args.size, "images": len(datalist), "pipeline": [type(t).__name__ for t in transforms + random],
                  "train_samples_per_s": _r(train_rate), "target": DATA_TARGET}  # fmt: skip
        for case, ds in (
            ("data_cold", Dataset(datalist, transform=full)),
            ("data_warm", PersistentDataset(datalist, transform=full, cache_dir=os.path.join(tmp, "cache"))),
        ):
            fill = [_timed(lambda i=i: ds[i]) for i in range(len(ds))]  # first pass: imports, cache fill
            samples = [_timed(lambda i=i: ds[i]) for _ in range(2) for i in range(len(ds))]
            rate = len(samples) / sum(x.wall_s for x in samples)
            records.append({"case": case, **common, "samples": len(samples), "samples_per_s": _r(rate),
                            "ratio_vs_train": _r(rate / train_rate), "meets_target": rate / train_rate >= DATA_TARGET,
                            "first_pass_s": _r(sum(x.wall_s for x in fill))})  # fmt: skip
            _note(f"{case}: {records[-1]['samples_per_s']} samples/s")
    return records


def _add_step_options(p: argparse.ArgumentParser, batch_help: str) -> None:
    """``--batch`` (2), ``--steps`` (3), ``--warmup`` (1) and ``--threads`` of a model-step benchmark."""
    p.add_argument("--batch", type=int, default=2, help=f"{batch_help} (default 2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per model (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")


def _add_spad(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("spad", help="SPAD-ViT's MIM step vs MONAI's ViT of the same size")
    p.add_argument("--size", choices=sorted(SPAD_SIZES), default="base", help="model size (default base)")
    _add_step_options(p, "batch size")
    p.add_argument("--data", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the data pipeline (default on)")
    p.add_argument("--profile", action="store_true",
                   help="after the timed rounds, profile one step per model (phases, top ops) to stderr")  # fmt: skip
    p.set_defaults(func=_run_spad)


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


# ----------------------------------------------------------------------------------------------------------
# Pan-FM


def _run_panfm(args: argparse.Namespace) -> int:
    """Pan-FM encoder training steps (forward, backward) at organ missing rates, batched as pre-training batches
    them (``medfm.data.length_buckets`` + ``GroupBatchSampler``): the step cost should follow the tokens.

    Per rate, a pool of ``--pool`` subjects drops each organ with that probability (keeping at least one); the pool
    is cut into batches of ``--batch`` within ``--buckets`` token-count buckets (default ``pool / batch``, the
    tightest; ``--buckets 1`` is plain shuffling, each batch padded to its longest subject). One timed step runs
    every batch of the pool once; ``step_s`` is per batch. ``step_vs_no_missing`` compares with the first rate
    (0%), ``tokens_vs_no_missing`` the mean tokens per subject, ``padded_tokens_per_subject`` counts padding."""
    from medfm.data import DEFAULT_ORGAN_SHAPES, ORGANS, GroupBatchSampler, length_buckets
    from medfm.networks.nets import PanFMEncoder

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.pool < args.batch:
        raise SystemExit(f"--pool ({args.pool}) must hold at least one batch of --batch ({args.batch}).")
    torch.manual_seed(0)
    base = {"brain": (96, 112, 96), "heart": (64, 64, 48), "adipose": (96, 64, 32), "liver": (80, 80, 48),
            "kidney": (64, 64, 48), "spleen": (64, 48, 48), "pancreas": (64, 48, 32)}  # panfm train.json
    shapes = base if args.size == "base" else {o: tuple(max(8, s // 32 * 8) for s in DEFAULT_ORGAN_SHAPES[o]) for o in ORGANS}
    size = {"base": (768, 12, 12, 3072, 16), "tiny": (48, 2, 3, 96, 8)}[args.size]
    enc = PanFMEncoder(ORGANS, shapes, patch_size=size[4], hidden_size=size[0], num_layers=size[1], num_heads=size[2],
                       mlp_dim=size[3]).train()  # fmt: skip
    b, n = args.batch, args.pool
    buckets = args.buckets or max(1, n // b)
    images = {o: torch.rand(n, 1, *shapes[o]) for o in ORGANS}
    ntok = torch.tensor([enc.num_tokens[o] for o in ORGANS])
    gen = torch.Generator().manual_seed(0)
    plans: dict[float, list[tuple[dict[str, torch.Tensor], torch.Tensor]]] = {}
    stats: dict[float, dict[str, float]] = {}
    for rate in args.rates:
        p = torch.rand(n, len(ORGANS), generator=gen) >= rate
        p[torch.arange(n), torch.randint(len(ORGANS), (n,), generator=gen)] |= ~p.any(1)  # keep one organ
        counts = (p.long() * ntok).sum(1)
        sampler = GroupBatchSampler(length_buckets(counts.tolist(), buckets, b), b, shuffle=True, seed=0)
        batches = [torch.tensor(idx) for idx in sampler]
        plans[rate] = [({o: x[idx] for o, x in images.items()}, p[idx]) for idx in batches]
        stats[rate] = {"organs": float(p.float().sum(1).mean()), "tokens": float(counts.float().mean()),
                       "padded": float(sum(int(counts[idx].max()) * len(idx) for idx in batches)) / n,
                       "batches": len(batches)}  # fmt: skip

    def epoch(rate: float) -> None:
        for imgs, present in plans[rate]:
            enc.zero_grad(set_to_none=True)
            enc(imgs, present).cls.sum().backward()

    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for rate in args.rates:
        with FlopCounterMode(display=False, custom_mapping=_sdpa_cpu_flop_mapping()) as fc:
            epoch(rate)
        flops[rate] = int(fc.get_total_flops()) // stats[rate]["batches"]
    runners = {f"missing_{round(100 * r)}": (lambda r=r: epoch(r)) for r in args.rates}
    samples, _, rounds, clean = _time_rounds(runners, dict.fromkeys(runners, args.warmup), args.steps, 30.0)
    ref = ref_tokens = None
    for rate, name in zip(args.rates, runners):
        summ = _summary(samples[name])
        per_batch = summ["step_s"] / stats[rate]["batches"]
        ref = ref or per_batch
        ref_tokens = ref_tokens or stats[rate]["tokens"]
        _emit({"case": name, "size": args.size, "batch": b, "pool": n, "buckets": buckets, "missing_rate": rate,
               "organs_present": round(stats[rate]["organs"], 3),
               "tokens_per_subject": round(stats[rate]["tokens"], 1),
               "padded_tokens_per_subject": round(stats[rate]["padded"], 1),
               "tokens_vs_no_missing": _r(stats[rate]["tokens"] / ref_tokens),
               "flops_per_step": flops[rate], "step_vs_no_missing": _r(per_batch / ref),
               "batches": stats[rate]["batches"], "step_s": _r(per_batch),
               **{k.replace("step_s", "epoch_s"): v for k, v in summ.items()},
               "rounds": len(rounds), "quiet_rounds": len(clean)})  # fmt: skip
    return 0


def _add_panfm(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("panfm", help="Pan-FM encoder step at organ missing rates (packing, token buckets)")
    p.add_argument("--size", choices=["base", "tiny"], default="base", help="model size (default base)")
    p.add_argument("--batch", type=int, default=4, help="subjects per batch (default 4)")
    p.add_argument("--pool", type=int, default=16, help="subjects per rate, batched by token buckets (default 16)")
    p.add_argument("--buckets", type=int, default=None, help="token-count buckets (default pool / batch; 1: shuffled)")
    p.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6], help="organ missing rates")
    p.add_argument("--steps", type=int, default=3, help="timed passes over the pool per rate (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up passes per rate (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.set_defaults(func=_run_panfm)


class _OrganVolumes(torch.utils.data.Dataset):
    """Subjects with every organ at ``train.json``'s grids (random voxels, made on access as a loader would)."""

    def __init__(self, n: int, shapes: dict[str, Sequence[int]]):
        self.n, self.shapes = n, shapes

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(i)
        d: dict[str, Any] = {f"image_{o}": torch.rand(1, *s, generator=g) for o, s in self.shapes.items()}
        return {**d, "present": torch.ones(len(self.shapes), dtype=torch.bool), "subject": f"s{i}",
                "labels": torch.tensor([float(i % 2), float(i % 3 == 0)])}  # fmt: skip


class _OrganMeans(nn.Module):
    """Logits from each organ's mean intensity: a network of negligible size, so RSS measures the protocol."""

    def __init__(self, organs: Sequence[str]):
        super().__init__()
        self.organs = list(organs)
        self.linear = nn.Linear(len(self.organs), 2)

    def forward(self, images: dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.stack([images[o].flatten(1).mean(1) for o in self.organs], 1) * present)


def _panfm_eval_child(mode: str, n: int, batch: int) -> None:
    """One measurement in this (fresh) process: peak RSS of the robustness protocol over ``n`` subjects."""
    import resource

    from monai.bundle import ConfigParser

    from medfm.metrics import missing_organ_robustness

    shapes = ConfigParser.load_config_file(str(PANFM_TRAIN_CONFIG))["organ_shapes"]
    data: Any = _OrganVolumes(n, shapes)
    if mode == "materialised":  # what the protocol did before streaming: every subject loaded first
        data = [data[i] for i in range(n)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        missing_organ_robustness(_OrganMeans(list(shapes)), data, list(shapes), ["a", "b"], out, batch_size=batch)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": round(peak_kib / 1024, 1), "seconds": round(time.perf_counter() - start, 2)}),
          file=_STDOUT)  # fmt: skip


def _run_panfm_eval(args: argparse.Namespace) -> int:
    if args.child:
        _panfm_eval_child(args.child, args.subjects[0], args.batch)
        return 0
    import subprocess

    for mode in ("streamed", "materialised"):
        for n in args.subjects:
            cmd = [sys.executable, __file__, "panfm-eval", "--child", mode, "--subjects", str(n), "--batch",
                   str(args.batch)]  # fmt: skip
            env = dict(os.environ)
            if args.mmap_threshold:  # glibc: allocations above this size are mmapped and returned when freed
                env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
            res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            _emit({"case": "panfm_eval", "mode": mode, "subjects": n, "batch": args.batch,
                   "malloc_mmap_threshold": args.mmap_threshold or "glibc default",
                   "mb_per_subject": round(_PANFM_SUBJECT_VOXELS * 4 / 2**20, 2),
                   **json.loads(res.stdout)})  # fmt: skip
    return 0


def _add_panfm_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("panfm-eval", help="peak memory of Pan-FM's robustness protocol at test-set sizes")
    p.add_argument("--subjects", type=int, nargs="+", default=[32, 128], help="test-set sizes (default 32 128)")
    p.add_argument("--batch", type=int, default=8, help="subjects per batch (default 8)")
    p.add_argument("--mmap-threshold", type=int, default=0,
                   help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the measured processes (default: unset)")
    p.add_argument("--child", choices=["streamed", "materialised"], default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_panfm_eval)


def _synthetic_petct_transform(shape: Sequence[int]) -> Any:
    """A MONAI ``Transform`` (cacheable by ``PersistentDataset``): :class:`_SyntheticPETCTd` of ``shape``."""
    from monai.transforms import Transform

    return type("SyntheticPETCTd", (_SyntheticPETCTd, Transform), {})(shape)


class _SyntheticPETCTd:
    """Deterministic stand-in for FratMAE's loading (no file I/O): a whole-body-sized PET/CT case from its seed,
    intensities already in [0, 1] (as after the bundle's clipped scaling), zeros outside a body ellipse, 4 lesions."""

    def __init__(self, shape: Sequence[int]):
        self.shape = tuple(int(n) for n in shape)

    def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        from monai.data import MetaTensor

        rng = np.random.default_rng(int(d["seed"]))
        x, y = np.ogrid[: self.shape[0], : self.shape[1]]
        rx, ry = (x - self.shape[0] / 2) / (0.4 * self.shape[0]), (y - self.shape[1] / 2) / (0.3 * self.shape[1])
        body = rx**2 + ry**2 < 1
        body = np.broadcast_to(body[..., None], self.shape)
        ct = np.where(body, np.clip(rng.normal(0.5, 0.08, self.shape), 0, 1), 0).astype(np.float32)
        pet = np.where(body, np.clip(rng.gamma(2.0, 0.03, self.shape), 0, 1), 0).astype(np.float32)
        label = np.zeros(self.shape, np.uint8)
        for _ in range(4):
            c = [int(rng.integers(n // 4, 3 * n // 4)) for n in self.shape]
            label[tuple(slice(max(i - 6, 0), i + 6) for i in c)] = 1
        affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64))
        return {"case": d["case"], "image": MetaTensor(np.stack([pet, ct]), affine=affine),
                "label": MetaTensor(label[None], affine=affine)}  # fmt: skip


def _run_crop_cache(args: argparse.Namespace) -> int:
    from monai.data import PersistentDataset
    from monai.transforms import Compose, RandCropByPosNegLabeld

    from medfm.data import CropCacheDataset, transform_state_hash

    for name, cls in (("PersistentDataset", PersistentDataset), ("CropCacheDataset", CropCacheDataset)):
        with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
            crop = RandCropByPosNegLabeld(["image", "label"], label_key="label", spatial_size=args.roi, pos=1, neg=1,
                                          num_samples=1, image_key="image", image_threshold=0)  # fmt: skip
            ds = cls([{"case": "c0", "seed": 0}], Compose([_synthetic_petct_transform(args.shape), crop]), tmp,
                     hash_transform=transform_state_hash)  # fmt: skip
            ds.transform.set_random_state(0)
            t0 = time.perf_counter()
            ds[0]
            first = time.perf_counter() - t0
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp) for f in fs)
            t0 = time.perf_counter()
            for _ in range(args.samples):
                ds[0]
            per = (time.perf_counter() - t0) / args.samples
            _emit({"case": "crop_cache", "dataset": name, "shape": list(args.shape), "roi": list(args.roi),
                   "first_pass_s": _r(first), "cache_mb_per_case": _r(size / 2**20),
                   "samples_per_s": _r(1 / per)})  # fmt: skip
    return 0


def _loader_rate(ds: Any, workers: int, epochs: int) -> float:
    """Samples per second through a ``DataLoader`` (batch 1) over ``epochs`` epochs; with workers, an untimed first
    epoch starts them."""
    from monai.data import DataLoader

    loader = DataLoader(ds, batch_size=1, shuffle=False, num_workers=workers, persistent_workers=workers > 0)
    if workers:
        for _ in loader:
            pass
    t0, n = time.perf_counter(), 0
    for _ in range(epochs):
        for _ in loader:
            n += 1
    return n / (time.perf_counter() - t0)


def _seg_flops_per_sample(parser: Any) -> int:
    """FLOPs of one forward and backward of ``finetune_seg.json``'s network on one crop of ``roi_size``."""
    from torch.utils.flop_counter import FlopCounterMode

    net = parser.get_parsed_content("network_def").train()
    x = torch.rand(1, 2, *parser.get_parsed_content("roi_size"))
    with FlopCounterMode(display=False, custom_mapping=_sdpa_cpu_flop_mapping()) as counter:
        out = net(x)
        (out[0] if isinstance(out, (list, tuple)) else out).float().mean().backward()
    return int(counter.get_total_flops())


def _run_data_scale(args: argparse.Namespace) -> int:
    """FratMAE's data paths on whole-body cases of real size (module doc of the ``data`` subcommand)."""
    from monai.bundle import ConfigParser
    from monai.data import PersistentDataset
    from monai.transforms import Compose

    from medfm.data import CropCacheDataset, generate_synthetic_petct, transform_state_hash

    seg = ConfigParser(globals={"medfm": "medfm"})
    seg.read_config(str(FRATMAE_TRAIN_CONFIG.parent / "finetune_seg.json"))
    pre = ConfigParser(globals={"medfm": "medfm"})
    pre.read_config(str(FRATMAE_TRAIN_CONFIG))
    pipelines = {
        "segmentation": (Compose(seg.get_parsed_content("load_transforms")
                                 + seg.get_parsed_content("train#random_transforms")),
                         [PersistentDataset, CropCacheDataset]),
        "pretraining": (Compose(pre.get_parsed_content("train#deterministic_transforms")
                                + pre.get_parsed_content("train#random_transforms")), [PersistentDataset]),
    }  # fmt: skip
    seg_flops = _seg_flops_per_sample(seg)
    gpu_seg = GPU_MFU_ASSUMED * H100_BF16_DENSE_FLOPS / seg_flops
    _note(f"segmentation network: {seg_flops / 1e9:.0f} GFLOP per crop (forward + backward)")
    with tempfile.TemporaryDirectory(prefix="medfm_bench_data_") as tmp:
        items = []
        for i in range(args.cases):  # one folder per case, written only when the run reaches it
            root = os.path.join(tmp, f"case{i}")
            t0 = time.perf_counter()
            (case,) = generate_synthetic_petct(root, num_cases=1, shape=args.shape, spacing=args.spacing, seed=i)
            _note(f"case {i}: written in {time.perf_counter() - t0:.1f} s")
            items.append({"case": f"{case}_{i}", "ct": f"{root}/imagesTr/{case}_0000.nii.gz",
                          "pet": f"{root}/imagesTr/{case}_0001.nii.gz", "label": f"{root}/labelsTr/{case}.nii.gz",
                          "prompt": "", "tracer": "fdg", "diagnosis": "", "age": 60, "sex": "F",
                          "stage": 0})  # fmt: skip
        raw = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tmp) for f in fs) / args.cases
        for name, (transform, classes) in pipelines.items():
            for cls in classes:
                cache = os.path.join(tmp, f"cache_{name}_{cls.__name__}")
                ds = cls(items, transform, cache, hash_transform=transform_state_hash)
                t0 = time.perf_counter()
                for i in range(len(ds)):
                    ds[i]
                first = (time.perf_counter() - t0) / len(ds)
                size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(cache) for f in fs) / len(ds)
                for workers in args.workers:
                    rate = _loader_rate(ds, workers, args.epochs)
                    rec = {"case": "data", "pipeline": name, "dataset": cls.__name__, "shape": list(args.shape),
                           "cases": len(ds), "workers": workers, "first_pass_s_per_case": _r(first),
                           "raw_mb_per_case": _r(raw / 2**20), "cache_mb_per_case": _r(size / 2**20),
                           "samples_per_s": _r(rate)}  # fmt: skip
                    if name == "segmentation":
                        rec |= {"gflop_per_sample": _r(seg_flops / 1e9, 4), "h100_samples_per_s_at_40pct": _r(gpu_seg),
                                "ratio_vs_h100": _r(rate / gpu_seg)}  # fmt: skip
                    _emit(rec)
                shutil.rmtree(cache, ignore_errors=True)
    return 0


def _add_data_scale(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="FratMAE's data paths on whole-body cases of real size")
    p.add_argument("--cases", type=int, default=3, help="synthetic cases (default 3)")
    p.add_argument("--shape", type=int, nargs=3, default=[400, 400, 326], help="grid (default AutoPET's PET grid)")
    p.add_argument("--spacing", type=float, nargs=3, default=[2.04, 2.04, 3.0], help="voxel size in mm")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="loader processes (default 0 2 4)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per setting (default 2)")
    p.set_defaults(func=_run_data_scale)


def _add_crop_cache(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("crop-cache", help="segmentation crops from PersistentDataset vs CropCacheDataset")
    p.add_argument("--shape", type=int, nargs=3, default=[400, 400, 326], help="case grid (default AutoPET's PET)")
    p.add_argument("--roi", type=int, nargs=3, default=[160, 32, 192], help="crop size (default the coronal stack)")
    p.add_argument("--samples", type=int, default=20, help="timed samples after the cache is filled (default 20)")
    p.set_defaults(func=_run_crop_cache)


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
        t.bf16 = bf16  # the forward under autocast, the loss outside, as SSLIteration(bf16=True)
    else:
        t.autocast_bf16 = bf16
    return t


def _device_pairs(model: str, size: str, b: int) -> list[Trainee]:
    """The MONAI peer and our model for one of ``fratmae``, ``spad``, ``midol`` (as their own subcommands build them)."""
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
        warm = {t.name: args.warmup + (2 if args.compile else 0) for t in trainees}
        samples, all_samples, rounds, clean = _time_rounds(runners, warm, args.steps, 0.0)
        memory = {t.name: _peak_memory(t) for t in trainees}
        rec, peak32, peak16 = _matmul_peak_record(start if not args.bf16 else {}, start if args.bf16 else {}, 5,
                                                  device)  # fmt: skip
        peak = peak16 if args.bf16 else peak32
        recs = _step_records(
            list(runners), samples, all_samples, rounds, clean, flops, dict.fromkeys(runners, peak),
            lambda n: {"case": f"gpu_{n}", "model": model, "device": name, "precision": tag, "compile": args.compile,
                       "size": args.size, "batch": args.batch,
                       "params": _params(next(t.module for t in trainees if t.name == n)),
                       "peak_memory_gib": _r(memory[n])},
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


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_fratmae, _add_spad, _add_panfm,
                                                                    _add_panfm_eval, _add_crop_cache, _add_midol,
                                                                    _add_data_scale, _add_device]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="model", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    sys.stdout = sys.stderr  # keep library prints off the JSON stream
    try:
        return args.func(args)
    finally:
        sys.stdout = _STDOUT


if __name__ == "__main__":
    sys.exit(main())
