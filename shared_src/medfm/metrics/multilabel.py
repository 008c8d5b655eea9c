"""Multi-label evaluation: AUROC per label and macro, and a per-subject probability table (Pan-FM)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from scipy.stats import rankdata

__all__ = ["SubjectProbabilityWriter", "auroc", "multilabel_auroc", "write_auroc_table"]


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve of one label (Mann-Whitney U with mid-ranks for ties); NaN when ``labels`` holds
    a single class (AUROC is undefined there)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.size} vs {y.size}.")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1.")
    pos = int(y.sum())
    neg = y.size - pos
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def multilabel_auroc(probs: Any, labels: Any) -> tuple[np.ndarray, float]:
    """AUROC of each column of ``probs`` (N, K) against ``labels`` (N, K), and their mean over the defined ones."""
    p = probs.detach().cpu().numpy() if isinstance(probs, torch.Tensor) else np.asarray(probs)
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if p.ndim != 2 or p.shape != y.shape:
        raise ValueError(f"probs and labels must both be (N, K), got {p.shape} and {y.shape}.")
    per = np.array([auroc(p[:, k], y[:, k]) for k in range(p.shape[1])])
    defined = per[~np.isnan(per)]
    return per, float(defined.mean()) if defined.size else float("nan")


def write_auroc_table(path: str, rows: Sequence[tuple[str, np.ndarray, float]], label_names: Sequence[str]) -> None:
    """CSV with one row per condition: ``condition, <label AUROCs...>, macro``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["condition", *label_names, "macro"])
        for name, per, macro in rows:
            w.writerow([name, *(f"{v:.4f}" for v in per), f"{macro:.4f}"])


class SubjectProbabilityWriter:
    """Collect ``sigmoid(logits)`` per subject during an evaluator run and write ``probabilities.csv``
    (``subject, <label names>``) and, when the batches carry labels, ``auroc.csv`` (per label and macro).

    Args:
        output_dir: where to write.
        label_names: column names, one per output.
        subject_key: batch key of the subject ids.
        label_key: batch key of the targets (None: no AUROC).
    """

    def __init__(
        self,
        output_dir: str,
        label_names: Sequence[str],
        subject_key: str = "subject",
        label_key: str | None = "labels",
    ) -> None:
        self.output_dir = output_dir
        self.label_names = list(label_names)
        self.subject_key = subject_key
        self.label_key = label_key
        self.reset()

    def reset(self) -> None:
        self.subjects: list[str] = []
        self.probs: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.reset())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def collect(self, engine: Engine) -> None:
        batch, out = engine.state.batch, engine.state.output
        if out is None:  # every item of the batch failed (medfm.engines.SkipFailedIteration recorded them)
            return
        logits = out["pred"] if isinstance(out, dict) else torch.stack([o["pred"] for o in out])
        probs = torch.sigmoid(logits.detach().float()).cpu().numpy()
        if probs.shape[1] != len(self.label_names):
            raise ValueError(f"the network gives {probs.shape[1]} outputs, label_names has {len(self.label_names)}.")
        self.subjects += [str(s) for s in batch[self.subject_key]]
        self.probs.append(probs)
        if self.label_key and batch.get(self.label_key) is not None:
            self.labels.append(torch.as_tensor(batch[self.label_key]).float().cpu().numpy())

    def write(self, engine: Engine | None = None) -> dict[str, Any]:
        os.makedirs(self.output_dir, exist_ok=True)
        probs = np.concatenate(self.probs) if self.probs else np.zeros((0, len(self.label_names)))
        with open(os.path.join(self.output_dir, "probabilities.csv"), "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["subject", *self.label_names])
            for s, p in zip(self.subjects, probs):
                w.writerow([s, *(f"{v:.6f}" for v in p)])
        result: dict[str, Any] = {"subjects": len(self.subjects)}
        if self.labels and len(self.labels) == len(self.probs):
            per, macro = multilabel_auroc(probs, np.concatenate(self.labels))
            rows = [("all organs", per, macro)]
            write_auroc_table(os.path.join(self.output_dir, "auroc.csv"), rows, self.label_names)
            result |= {"auroc": per, "macro_auroc": macro}
            if engine is not None:
                engine.state.metrics["macro_auroc"] = macro
        return result
