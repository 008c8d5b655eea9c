"""tools/bench.py panfm: tiny runs in this process; token buckets make the padded tokens, and so the FLOPs of a
step, follow the subjects' tokens (times at the tiny size are overhead; the timed claim is the base size's)."""

from __future__ import annotations

import pytest

from .bench_inprocess import bench_records

pytestmark = pytest.mark.slow  # runs the bundles or the tool end to end


@pytest.fixture(scope="module")
def runs() -> tuple[dict, dict]:
    with pytest.MonkeyPatch.context() as monkeypatch:
        args = ("panfm", "--size", "tiny", "--steps", "1", "--warmup", "0", "--pool", "32", "--rates", "0", "0.6")
        bucketed = {r["missing_rate"]: r for r in bench_records(monkeypatch, *args)}
        shuffled = {r["missing_rate"]: r for r in bench_records(monkeypatch, *args, "--buckets", "1")}
    return bucketed, shuffled


def test_records(runs):
    bucketed, shuffled = runs
    for recs in runs:
        assert set(recs) == {0.0, 0.6}
        full = recs[0.0]
        assert full["organs_present"] == 7.0 and full["tokens_vs_no_missing"] == 1.0
        assert full["padded_tokens_per_subject"] == full["tokens_per_subject"]
        assert full["batches"] == 8 and full["step_s"] == pytest.approx(full["epoch_s"] / 8, rel=1e-3)
        assert recs[0.6]["padded_tokens_per_subject"] >= recs[0.6]["tokens_per_subject"]
    assert bucketed[0.0]["buckets"] == 8 and shuffled[0.0]["buckets"] == 1


def test_bucketed_cost_follows_tokens(runs):
    bucketed, shuffled = runs
    sixty = bucketed[0.6]
    assert sixty["tokens_vs_no_missing"] < 0.6  # same pool draw in both runs
    assert sixty["tokens_per_subject"] == shuffled[0.6]["tokens_per_subject"]
    # buckets: padding within 15% of the tokens, and far less than padding to each shuffled batch's longest subject
    assert sixty["padded_tokens_per_subject"] <= 1.15 * sixty["tokens_per_subject"]
    assert sixty["padded_tokens_per_subject"] < 0.85 * shuffled[0.6]["padded_tokens_per_subject"]
    assert sixty["flops_per_step"] < shuffled[0.6]["flops_per_step"]
    # the blocks' FLOPs scale with the sequence (tokens + CLS); the tiny grids have one token per organ
    flops_ratio = sixty["flops_per_step"] / bucketed[0.0]["flops_per_step"]
    assert flops_ratio <= 1.15 * (sixty["tokens_per_subject"] + 1) / (bucketed[0.0]["tokens_per_subject"] + 1)
