"""``tools/demo_losses.py``'s comparison: equal runs pass, any changed loss, iteration count or run is reported."""

from __future__ import annotations

from . import load_tool

demo_losses = load_tool("demo_losses")

REF = {"a/pretrain": [{"loss": 1.0}, {"loss": 0.5}], "b/finetune": [{"loss": 2.0}]}


def test_same_losses_within_tolerance_pass():
    now = {"a/pretrain": [{"loss": 1.0 + 1e-7}, {"loss": 0.5}], "b/finetune": [{"loss": 2.0}]}
    assert demo_losses.compare(now, REF, rtol=1e-4, atol=1e-6) == []


def test_every_kind_of_difference_is_reported():
    now = {"a/pretrain": [{"loss": 1.0}, {"loss": 0.51}], "c/other": [{"loss": 2.0}]}
    problems = demo_losses.compare(now, REF, rtol=1e-4, atol=1e-6)
    assert any("different runs" in p for p in problems)
    assert any("a/pretrain iteration 1 loss" in p for p in problems)
    fewer = {"a/pretrain": [{"loss": 1.0}], "b/finetune": [{"cls_loss": 2.0}]}
    problems = demo_losses.compare(fewer, REF, rtol=1e-4, atol=1e-6)
    assert any("1 iterations vs 2" in p for p in problems) and any("loss names" in p for p in problems)
