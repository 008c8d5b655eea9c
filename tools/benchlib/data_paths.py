"""``bench.py crop-cache`` and ``data``: FratMAE's segmentation and pre-training data paths at real size."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from .harness import (
    FRATMAE_TRAIN_CONFIG,
    GPU_MFU_ASSUMED,
    H100_BF16_DENSE_FLOPS,
    _emit,
    _note,
    _r,
    _sdpa_cpu_flop_mapping,
)


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

    from medfm.data import (
        CropCacheDataset,
        generate_synthetic_petct,
        transform_state_hash,
    )

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
