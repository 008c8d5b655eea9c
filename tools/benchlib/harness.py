"""Shared parts of ``tools/bench.py``: JSON records, timing, the matmul peak, FLOP counting and the
``Trainee`` step every model case builds on.

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
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[2]
FRATMAE_TRAIN_CONFIG = REPO_ROOT / "bundles" / "fratmae_petct" / "configs" / "train.json"
SPAD_TRAIN_CONFIG = REPO_ROOT / "bundles" / "spad_vit" / "configs" / "train.json"
MIDOL_TRAIN_CONFIG = REPO_ROOT / "bundles" / "midol_multimodal" / "configs" / "train.json"
PANFM_TRAIN_CONFIG = REPO_ROOT / "bundles" / "panfm_panorgan" / "configs" / "train.json"
_PANFM_SUBJECT_VOXELS = 2_174_976  # voxels of one subject with every organ at train.json's grids
FUSED_ADAMW = True  # as the bundle configs set it; both models get the same optimizer
DATA_TARGET = 2.0  # the data pipeline should deliver at least this many times what training consumes
H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM, dense bf16 tensor-core peak (datasheet)
GPU_MFU_ASSUMED = 0.4  # what a GPU step is assumed to reach when estimating how fast it consumes samples
BENCH_SCRIPT = REPO_ROOT / "tools" / "bench.py"
CPU = torch.device("cpu")
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


def _matmul_gflops(n: int, dtype: torch.dtype, repeats: int, device: torch.device = CPU) -> list[float]:
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
    sizes: Sequence[int], dtype: torch.dtype, repeats: int, device: torch.device = CPU
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
    device: torch.device = CPU
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
    device: torch.device = CPU,
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


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _add_step_options(p: argparse.ArgumentParser, batch_help: str) -> None:
    """``--batch`` (2), ``--steps`` (3), ``--warmup`` (1) and ``--threads`` of a model-step benchmark."""
    p.add_argument("--batch", type=int, default=2, help=f"{batch_help} (default 2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per model (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
