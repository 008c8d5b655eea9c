"""Pan-FM's missing-organ robustness protocol, streamed one batch at a time, against a whole-set computation."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

from medfm.data import ORGANS
from medfm.metrics import missing_organ_conditions, missing_organ_robustness
from medfm.transforms import DropOrgansd

LABELS = ("a", "b")


class _Net(nn.Module):
    """Logits from each present organ's mean intensity (a fixed linear map), so dropping an organ changes them."""

    def __init__(self, log: list[int] | None = None, loaded: list[int] | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(len(ORGANS), len(LABELS), generator=g)
        self.log, self.loaded = log, loaded

    def forward(self, images: dict[str, torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        if self.log is not None:
            self.log.append(len(self.loaded))
        means = torch.stack([images[o].flatten(1).mean(1) for o in ORGANS], 1) * present.float()
        return means @ self.w


class _Subjects(torch.utils.data.Dataset):
    """Subjects made on access (as a Dataset with LoadOrgansd loads them); records which were loaded."""

    def __init__(self, n: int):
        self.n, self.loaded = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.loaded.append(i)
        g = torch.Generator().manual_seed(100 + i)
        present = torch.rand(len(ORGANS), generator=g) > 0.3
        present[i % len(ORGANS)] = True
        if i == 0:  # a one-organ subject: the leave-out condition of that organ scores one subject fewer
            present[:] = False
            present[0] = True
        d = {f"image_{o}": torch.rand(1, 4, 4, 4, generator=g) * (1 + k) for k, o in enumerate(ORGANS)}
        labels = (torch.rand(len(LABELS), generator=g) < torch.tensor([0.4, 0.6])).float()
        labels[i % 2] = float(i % 3 == 0)
        return {**d, "present": present, "labels": labels, "subject": f"s{i:03d}"}


def _pairwise_auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC as the share of (positive, negative) pairs ranked correctly, ties counting one half."""
    pos, neg = p[y == 1][:, None], p[y == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def _whole_set(net: nn.Module, subjects: list[dict], rates) -> dict[str, tuple[float, int]]:
    """Every condition applied to every subject at once, one forward pass, pairwise AUROC."""
    out = {}
    for name, kw in missing_organ_conditions(ORGANS, rates):
        drop = DropOrgansd(ORGANS, seed=3, dropped_key=None, **kw)
        items = [d for d in (drop(dict(s)) for s in subjects) if bool(d["present"].any())]
        images = {o: torch.stack([d[f"image_{o}"] for d in items]) for o in ORGANS}
        present = torch.stack([d["present"] for d in items])
        with torch.no_grad():
            p = torch.sigmoid(net(images, present)).numpy()
        y = torch.stack([d["labels"] for d in items]).numpy()
        out[name] = (float(np.mean([_pairwise_auroc(y[:, k], p[:, k]) for k in range(len(LABELS))])), len(items))
    return out


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_streamed_protocol_equals_the_whole_set_computation(batch_size, tmp_path):
    data = _Subjects(23)
    subjects = [data[i] for i in range(len(data))]
    expected = _whole_set(_Net(), subjects, (0.2, 0.6))
    rows = missing_organ_robustness(_Net(), _Subjects(23), ORGANS, LABELS, str(tmp_path), rates=(0.2, 0.6), seed=3,
                                    batch_size=batch_size)  # fmt: skip
    assert [r["condition"] for r in rows] == list(expected)
    for r in rows:
        macro, n = expected[r["condition"]]
        assert r["macro"] == pytest.approx(macro, abs=1e-6), r["condition"]
        assert r["subjects"] == n
    assert rows[1]["condition"] == f"without {ORGANS[0]}" and rows[1]["subjects"] == 22  # the one-organ subject
    table = list(csv.DictReader(open(tmp_path / "robustness_auroc.csv")))
    assert [float(t["macro"]) for t in table] == pytest.approx([r["macro"] for r in rows], abs=1e-4)


def test_each_subject_is_loaded_once_and_scoring_starts_after_one_batch(tmp_path):
    data = _Subjects(20)
    calls: list[int] = []
    missing_organ_robustness(_Net(calls, data.loaded), data, ORGANS, LABELS, str(tmp_path), batch_size=4)
    assert sorted(data.loaded) == list(range(20))  # loaded once, not once per condition
    assert calls[0] == 4  # the first forward pass comes after one batch of 4 subjects, not the whole set
    assert max(calls) == 20 and len(calls) == 5 * len(missing_organ_conditions(ORGANS, (0.2, 0.4, 0.6)))
