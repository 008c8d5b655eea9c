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
            cmd = [sys.executable, str(BENCH_SCRIPT), "panfm-eval", "--child", mode, "--subjects", str(n), "--batch",
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
