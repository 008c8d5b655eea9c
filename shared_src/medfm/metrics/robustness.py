"""Pan-FM's missing-organ robustness protocol: AUROC with every organ left out in turn and with organs dropped at
random (20/40/60%) at test time."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, list_data_collate
from torch import nn

from medfm.transforms.panfm import DropOrgansd

from .multilabel import multilabel_auroc, write_auroc_table

__all__ = ["missing_organ_conditions", "missing_organ_robustness"]

logger = logging.getLogger(__name__)


def missing_organ_conditions(organs: Sequence[str], rates: Sequence[float]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, DropOrgansd arguments)`` of the protocol: all organs, each organ left out, each random rate."""
    conds: list[tuple[str, dict[str, Any]]] = [("all organs", {"mode": "none"})]
    conds += [(f"without {o}", {"mode": "leave_out", "organ": o, "keep_at_least_one": False}) for o in organs]
    conds += [(f"random missing {round(100 * r)}%", {"mode": "random", "rate": float(r)}) for r in rates]
    return conds


def _as_list(batch: list[Any]) -> list[Any]:
    """Collate function that keeps a batch as its list of subjects (each condition drops organs per subject)."""
    return batch


@torch.no_grad()
def missing_organ_robustness(
    network: nn.Module,
    loaded: Sequence[Mapping[str, Any]],
    organs: Sequence[str],
    label_names: Sequence[str],
    output_dir: str,
    device: torch.device | str = "cpu",
    rates: Sequence[float] = (0.2, 0.4, 0.6),
    seed: int = 0,
    batch_size: int = 8,
    image_prefix: str = "image_",
    num_workers: int = 0,
) -> list[dict[str, Any]]:
    """Evaluate ``network`` (``network(images, present) -> logits``) under each missing-organ condition.

    ``loaded``: subjects after :class:`medfm.transforms.LoadOrgansd` (with ``labels``), e.g. a ``Dataset``.
    The subjects are streamed: one batch of ``batch_size`` subjects is loaded (by ``num_workers`` loader
    processes), every condition is applied to it and scored, and only the predicted probabilities are kept, so
    memory does not grow with the test set. Leaving an organ out removes it from every subject; a subject that
    had only that organ has nothing left and is not scored in that condition (counted in ``subjects``). Random
    drops are seeded per subject id (:class:`DropOrgansd`), so every model and every batch order sees the same
    drops. Writes ``robustness_auroc.csv`` (AUROC per label and macro per condition) and
    ``robustness_subjects.csv`` (subjects and mean organs per condition).

    Returns:
        one dict per condition: ``condition``, ``auroc`` (per label), ``macro``, ``subjects``, ``mean_organs``.
    """
    network.eval()
    keys = [image_prefix + o for o in organs]
    conditions = missing_organ_conditions(organs, rates)
    drops = [DropOrgansd(organs, seed=seed, dropped_key=None, image_prefix=image_prefix, **kw) for _, kw in conditions]
    # Preallocated result arrays: nothing allocated per batch outlives the batch, so the heap does not fragment
    # into one small block per batch between the freed subjects.
    n, n_labels = len(loaded), len(label_names)
    probs = np.zeros((len(conditions), n, n_labels), np.float32)
    labels = np.zeros_like(probs)
    organs_left = np.zeros((len(conditions), n), np.float32)  # 0: not scored in that condition
    loader = DataLoader(loaded, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_as_list)
    start = 0
    for subjects in loader:
        for c, drop in enumerate(drops):
            items = [drop(dict(d)) for d in subjects]
            rows = [start + i for i, d in enumerate(items) if bool(d["present"].any())]
            items = [{k: d[k] for k in (*keys, "present", "labels")} for d in items if bool(d["present"].any())]
            if not items:
                continue
            batch = list_data_collate(items)
            present = batch["present"].to(device)
            images = {o: batch[image_prefix + o].to(device) for o in organs}
            probs[c, rows] = torch.sigmoid(network(images, present).float()).cpu().numpy()
            labels[c, rows] = batch["labels"].float().numpy()
            organs_left[c, rows] = batch["present"].float().sum(1).numpy()
        start += len(subjects)
    results, rows_out = [], []
    for c, (name, _) in enumerate(conditions):
        scored = organs_left[c] > 0
        if not scored.any():
            logger.warning("condition %r leaves no subject with an organ; skipped", name)
            continue
        per, macro = multilabel_auroc(probs[c, scored], labels[c, scored])
        mean_organs = float(organs_left[c, scored].mean())
        results.append({"condition": name, "auroc": per.tolist(), "macro": macro, "subjects": int(scored.sum()),
                        "mean_organs": mean_organs})  # fmt: skip
        rows_out.append((name, per, macro))
        logger.info("robustness %-24s macro AUROC %.4f (%d subjects, %.2f organs each)", name, macro,
                    int(scored.sum()), mean_organs)  # fmt: skip
    write_auroc_table(os.path.join(output_dir, "robustness_auroc.csv"), rows_out, label_names)
    with open(os.path.join(output_dir, "robustness_subjects.csv"), "w", encoding="utf-8") as f:
        f.write("condition,subjects,mean_organs\n")
        f.writelines(f"{r['condition']},{r['subjects']},{r['mean_organs']:.3f}\n" for r in results)
    return results
