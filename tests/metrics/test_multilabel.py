"""AUROC per label: against a brute-force pairwise count."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medfm.metrics.multilabel import auroc, multilabel_auroc


def _pairwise(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 30)
        y[:2] = [0, 1]
        s = rng.integers(0, 6, 30).astype(float)  # many ties
        assert auroc(s, y) == pytest.approx(_pairwise(s, y))


def test_multilabel_per_label_macro_and_undefined_label():
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]])
    p = np.array([[0.9, 0.1, 0.2], [0.2, 0.3, 0.4], [0.4, 0.2, 0.9], [0.5, 0.8, 0.1]])
    per, macro = multilabel_auroc(p, y)
    assert per[0] == pytest.approx(_pairwise(p[:, 0], y[:, 0]))
    assert np.isnan(per[1]) and np.isnan(per[2])  # one class only
    assert macro == pytest.approx(per[0])
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([0.1, 0.2], [0, 2])
