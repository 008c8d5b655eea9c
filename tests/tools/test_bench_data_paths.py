"""tools/bench.py midol and crop-cache: tiny runs in this process (the timed claims are the base sizes' in
docs/benchmarks.md); the records carry what the docs quote, and the counted FLOPs agree with a hand count."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .bench_inprocess import bench_records

pytestmark = pytest.mark.slow  # runs the bundles or the tool end to end

REPO = Path(__file__).resolve().parents[2]


def _cli_records(*args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), *args], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=300, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(ln) for ln in proc.stdout.splitlines() if ln.strip()]


@pytest.fixture
def records(monkeypatch):
    return lambda *args: bench_records(monkeypatch, *args)


def test_midol_step_and_pipeline_records(records):
    runs = records("midol", "--size", "tiny", "--steps", "1", "--workers", "0")
    recs = {(r["case"], r.get("workers")): r for r in runs}
    ours, monai = recs[("midol_swin", None)], recs[("monai_swin", None)]
    assert ours["params"] < monai["params"]  # MONAI's encoder merges patches once more after the last stage
    assert 0.8 < ours["flops_ratio_vs_monai"] < 1.1
    assert ours["ratio_vs_monai"] == pytest.approx(ours["mfu"] / monai["mfu"], rel=1e-2)
    data = recs[("midol_data", 0)]
    assert data["views"] == 4 and data["samples_per_s"] > 0
    # 2 global + 2 local views forward and backward (3 passes each), 2 teacher views forward: 14 / 3 of one view's
    # forward and backward, which the step record counts for a batch of 2 views
    assert data["flops_per_image"] == pytest.approx(ours["flops_per_step"] / 2 * 14 / 3, rel=1e-6)


def test_crop_cache_records(records):
    recs = {r["dataset"]: r for r in records("crop-cache", "--shape", "48", "40", "32", "--roi", "16", "8", "16",
                                               "--samples", "3")}  # fmt: skip
    old, new = recs["PersistentDataset"], recs["CropCacheDataset"]
    voxels = 48 * 40 * 32
    body = voxels * 3.14159 * 0.4 * 0.3  # the case's body ellipse (radii 0.4 and 0.3 of the grid), noise inside
    # the noise does not compress (two 16-bit channels, chunks stored raw when zlib saves < 20%); the zeros do
    assert 0.8 * body * 4 < new["cache_mb_per_case"] * 2**20 < 0.25 * old["cache_mb_per_case"] * 2**20
    assert new["samples_per_s"] > 0 and old["samples_per_s"] > 0


def test_device_mode_runs_each_model_and_its_peer_on_the_cpu(records):
    """``gpu --device cpu``: the code a GPU runs (placement, bf16 autocast, synced timing), on the CPU."""
    runs = records("gpu", "--device", "cpu", "--size", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0",
                    "--models", "midol", "fratmae", "--matmul-sizes", "128")  # fmt: skip
    recs = {r["case"]: r for r in runs if r["case"] != "matmul_peak"}
    peaks = [r for r in runs if r["case"] == "matmul_peak"]
    assert [p["model"] for p in peaks] == ["midol", "fratmae"] and all(p["bf16_gflops"] > 0 for p in peaks)
    a, b = recs["gpu_monai_swin"], recs["gpu_midol_swin"]
    assert a["precision"] == b["precision"] == "bf16" and a["peak_memory_gib"] is None
    assert b["ratio_vs_monai"] == pytest.approx(b["mfu"] / a["mfu"], rel=1e-2)
    # MONAI's MaskedAutoEncoderViT fails under bf16 autocast: recorded, not hidden; FratMAE still runs
    assert "error" in recs["gpu_monai_mae"] and recs["gpu_fratmae"]["mfu"] > 0


def test_data_case_records_both_datasets_and_the_gpu_estimate(monkeypatch):
    """``bench.py data`` in this process on one small generated case (the segmentation network's FLOP count,
    which costs a ViT-B step at the real crop size, is replaced by a fixed figure)."""
    import argparse

    monkeypatch.syspath_prepend(str(REPO / "tools"))
    from benchlib import data_paths

    records = []
    monkeypatch.setattr(data_paths, "_emit", records.append)
    monkeypatch.setattr(data_paths, "_seg_flops_per_sample", lambda parser: 10**12)
    args = argparse.Namespace(cases=1, shape=[48, 40, 32], spacing=[4.0, 4.0, 4.0], workers=[0], epochs=1)
    assert data_paths._run_data_scale(args) == 0
    recs = {(r["pipeline"], r["dataset"]): r for r in records}
    assert set(recs) == {("segmentation", "PersistentDataset"), ("segmentation", "CropCacheDataset"),
                         ("pretraining", "PersistentDataset")}  # fmt: skip
    seg = recs[("segmentation", "CropCacheDataset")]
    gpu = data_paths.GPU_MFU_ASSUMED * data_paths.H100_BF16_DENSE_FLOPS / 10**12
    assert seg["h100_samples_per_s_at_40pct"] == pytest.approx(gpu, rel=1e-3)
    assert seg["ratio_vs_h100"] == pytest.approx(seg["samples_per_s"] / gpu, rel=1e-2)
    assert seg["cache_mb_per_case"] < recs[("segmentation", "PersistentDataset")]["cache_mb_per_case"]
    assert all(r["samples_per_s"] > 0 and r["cases"] == 1 and r["workers"] == 0 for r in records)


def test_panfm_eval_memory_follows_the_test_set_only_when_materialised():
    """``bench.py panfm-eval``: four measurements, each in a fork of the just-started command with its peak RSS
    reset; 12 more subjects (8.3 MB of voxels each) raise the peak RSS of the materialised protocol by about their
    size, and of the streamed (shipped) one by far less. The tool runs as a command: a fork of this process would
    reuse the memory earlier tests freed without raising its RSS."""
    recs = {(r["mode"], r["subjects"]): r["peak_rss_mb"] for r in _cli_records("panfm-eval", "--subjects", "4", "16",
                                                                             "--batch", "2")}  # fmt: skip
    data_mb = 12 * 8.3
    grown = {m: recs[(m, 16)] - recs[(m, 4)] for m in ("streamed", "materialised")}
    assert grown["materialised"] > 0.7 * data_mb, grown
    assert grown["streamed"] < 0.3 * data_mb, grown

