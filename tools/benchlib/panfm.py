"""``bench.py panfm`` and ``panfm-eval``: Pan-FM's step at organ missing rates, and the robustness protocol's
memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .harness import (
    _PANFM_SUBJECT_VOXELS,
    _STDOUT,
    BENCH_SCRIPT,
    PANFM_TRAIN_CONFIG,
    _emit,
    _r,
    _sdpa_cpu_flop_mapping,
    _summary,
    _time_rounds,
)

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
    from medfm.data import (
        DEFAULT_ORGAN_SHAPES,
        ORGANS,
        GroupBatchSampler,
        length_buckets,
    )
    from medfm.networks.nets import PanFMEncoder

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.pool < args.batch:
        raise SystemExit(f"--pool ({args.pool}) must hold at least one batch of --batch ({args.batch}).")
    torch.manual_seed(0)
    base = {"brain": (96, 112, 96), "heart": (64, 64, 48), "adipose": (96, 64, 32), "liver": (80, 80, 48),
            "kidney": (64, 64, 48), "spleen": (64, 48, 48), "pancreas": (64, 48, 32)}  # panfm train.json
    tiny = {o: tuple(max(8, s // 32 * 8) for s in DEFAULT_ORGAN_SHAPES[o]) for o in ORGANS}
    shapes = base if args.size == "base" else tiny
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


def _panfm_eval_measure(mode: str, n: int, batch: int) -> dict[str, float]:
    """One measurement in this process: peak RSS of the robustness protocol over ``n`` subjects (the process's
    high-water mark, so it must be fresh: a fresh interpreter, or a fork whose mark was just reset)."""
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
    if os.path.exists("/proc/self/status"):  # this process's own peak (ru_maxrss may hold an exec'ing parent's)
        peak_kib = _status_kib("VmHWM")
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mb": round(peak_kib / 1024, 1), "seconds": round(time.perf_counter() - start, 2)}


_CLEAR_REFS = "/proc/self/clear_refs"  # Linux: writing "5" resets the process's peak RSS to its current RSS
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter that MALLOC_MMAP_THRESHOLD_ sets


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``: peak RSS; ``VmRSS``: current RSS)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"no {field} in /proc/self/status")


def _measure_in_fork(mode: str, n: int, batch: int, mmap_threshold: int) -> dict[str, float]:
    """:func:`_panfm_eval_measure` in a fork of this process, its peak RSS reset at the start: a fresh process
    without a second interpreter start. This process must have computed nothing yet (its freed memory would be
    reused by the child without raising its RSS), which holds for ``bench.py panfm-eval`` run as a command."""
    import ctypes
    import traceback

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, send the record, exit without running the parent's cleanup
        code = 1
        try:
            os.close(read_fd)
            if mmap_threshold and ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1:
                raise RuntimeError(f"mallopt(M_MMAP_THRESHOLD, {mmap_threshold}) failed")
            with open(_CLEAR_REFS, "w", encoding="ascii") as f:
                f.write("5")
            with os.fdopen(write_fd, "w", encoding="utf-8") as w:
                w.write(json.dumps(_panfm_eval_measure(mode, n, batch)))
            code = 0
        except BaseException:  # noqa: BLE001 - reported to the parent through the exit code and stderr
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, encoding="utf-8") as r:
        text = r.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the panfm-eval measurement ({mode}, {n} subjects) failed; its traceback is above")
    return json.loads(text)


def _measure_in_new_interpreter(mode: str, n: int, batch: int, mmap_threshold: int) -> dict[str, float]:
    """:func:`_panfm_eval_measure` in a new interpreter (where the peak RSS cannot be reset)."""
    import subprocess

    cmd = [sys.executable, str(BENCH_SCRIPT), "panfm-eval", "--child", mode, "--subjects", str(n), "--batch",
           str(batch)]  # fmt: skip
    env = dict(os.environ)
    if mmap_threshold:  # glibc: allocations above this size are mmapped and returned when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout)


def _run_panfm_eval(args: argparse.Namespace) -> int:
    if args.child:
        print(json.dumps(_panfm_eval_measure(args.child, args.subjects[0], args.batch)), file=_STDOUT)
        return 0
    forked = hasattr(os, "fork") and os.path.exists(_CLEAR_REFS)
    measure = _measure_in_fork if forked else _measure_in_new_interpreter
    for mode in ("streamed", "materialised"):
        for n in args.subjects:
            rec = measure(mode, n, args.batch, args.mmap_threshold)
            _emit({"case": "panfm_eval", "mode": mode, "subjects": n, "batch": args.batch,
                   "malloc_mmap_threshold": args.mmap_threshold or "glibc default",
                   "process": "fork" if forked else "interpreter",
                   "mb_per_subject": round(_PANFM_SUBJECT_VOXELS * 4 / 2**20, 2), **rec})  # fmt: skip
    return 0


def _add_panfm_eval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("panfm-eval", help="peak memory of Pan-FM's robustness protocol at test-set sizes")
    p.add_argument("--subjects", type=int, nargs="+", default=[32, 128], help="test-set sizes (default 32 128)")
    p.add_argument("--batch", type=int, default=8, help="subjects per batch (default 8)")
    p.add_argument("--mmap-threshold", type=int, default=0,
                   help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the measured processes (default: unset)")
    p.add_argument("--child", choices=["streamed", "materialised"], default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_run_panfm_eval)
