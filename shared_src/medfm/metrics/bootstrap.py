"""Non-parametric percentile bootstrap confidence interval of a mean over cases.

References:
    - Efron & Tibshirani, *An Introduction to the Bootstrap* (1993), ch. 13 (percentile interval).
    - FratMAE (arXiv:2503.02824) reports Dice / IoU with 95% CIs from 1,000 bootstrap samples over cases.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["bootstrap_ci"]


def bootstrap_ci(
    values: Any, num_samples: int = 1000, confidence: float = 0.95, seed: int | None = 0
) -> tuple[float, float, float]:
    """Mean of per-case values and its percentile bootstrap confidence interval.

    Draws one ``(num_samples, n)`` matrix of case indices with replacement from
    ``numpy.random.default_rng(seed).integers(0, n, size=(num_samples, n))``, takes the mean of each row, and
    returns the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles (``numpy.quantile``, linear
    interpolation) of these ``num_samples`` resampled means. The same seed always gives the same interval.

    Args:
        values: per-case values, shape (n,) (any array-like; flattened), numpy or torch.
        num_samples: number of bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the numpy ``Generator``; ``None`` for a non-deterministic draw.

    Returns:
        ``(mean, low, high)``: the plain mean of ``values`` and the interval bounds.

    Raises:
        ValueError: empty or non-finite ``values``, ``num_samples < 1``, ``confidence`` outside (0, 1).
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_ci needs at least one value, got an empty input.")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"bootstrap_ci needs finite values, got {v[~np.isfinite(v)].tolist()} among them.")
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(int(num_samples), v.size))
    means = v[idx].mean(axis=1)
    alpha = (1.0 - float(confidence)) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(v.mean()), float(low), float(high)
