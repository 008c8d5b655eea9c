"""Percentile bootstrap CI: collapse, agreement with a slow loop, coverage / width, determinism, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medfm.metrics import bootstrap_ci


def _slow_bootstrap(values: list[float], num_samples: int, confidence: float, seed: int) -> tuple[float, float, float]:
    """Loop implementation: same index draw, per-row Python means, hand-written linear-interpolation quantile."""
    n = len(values)
    idx = np.random.default_rng(seed).integers(0, n, size=(num_samples, n))
    means = sorted(sum(values[int(j)] for j in row) / n for row in idx)

    def quantile(q: float) -> float:
        pos = q * (len(means) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(means) - 1)
        return means[lo] + (pos - lo) * (means[hi] - means[lo])

    alpha = (1 - confidence) / 2
    return sum(values) / n, quantile(alpha), quantile(1 - alpha)


def test_constant_values_collapse():
    assert bootstrap_ci([0.83] * 17, num_samples=200) == pytest.approx((0.83, 0.83, 0.83))
    assert bootstrap_ci([0.5]) == pytest.approx((0.5, 0.5, 0.5))


def test_matches_slow_loop():
    values = [0.91, 0.12, 0.55, 0.73, 0.66, 0.05, 0.98, 0.41, 0.30]
    for confidence, seed in ((0.95, 0), (0.9, 7)):
        got = bootstrap_ci(values, num_samples=500, confidence=confidence, seed=seed)
        assert got == pytest.approx(_slow_bootstrap(values, 500, confidence, seed), abs=1e-12)


def test_coverage_and_width_normal_sample():
    values = np.random.default_rng(123).normal(0.7, 0.1, size=200)
    mean, low, high = bootstrap_ci(values, num_samples=2000)
    assert low < mean < high
    assert low < 0.7 < high
    expected_width = 2 * 1.96 * 0.1 / math.sqrt(200)
    assert high - low == pytest.approx(expected_width, rel=0.2)


def test_deterministic_for_seed_and_torch_input():
    values = np.random.default_rng(1).uniform(size=30)
    a = bootstrap_ci(values, seed=5)
    assert bootstrap_ci(values, seed=5) == a
    assert bootstrap_ci(torch.from_numpy(values), seed=5) == pytest.approx(a)
    b = bootstrap_ci(values, seed=6)
    assert b[0] == a[0] and (b[1], b[2]) != (a[1], a[2])
    # a wider confidence gives a wider interval
    c = bootstrap_ci(values, confidence=0.5, seed=5)
    assert a[1] < c[1] <= c[2] < a[2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"values": []}, "empty"),
        ({"values": [0.1, float("nan")]}, "finite"),
        ({"values": [0.1], "num_samples": 0}, "num_samples"),
        ({"values": [0.1], "confidence": 1.0}, "confidence"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci(**kwargs)
