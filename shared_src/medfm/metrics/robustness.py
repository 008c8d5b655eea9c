"""Pan-FM's missing-organ robustness protocol: AUROC with every organ left out in turn and with organs dropped at
random (20/40/60%) at test time."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
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
) -> list[dict[str, Any]]:
    """Evaluate ``network`` (``network(images, present) -> logits``) under each missing-organ condition.

    ``loaded``: subjects after :class:`medfm.transforms.LoadOrgansd` (with ``labels``), e.g. a ``CacheDataset``.
    Leaving an organ out removes it from every subject; a subject that had only that organ has nothing left
    and is not scored in that condition (counted in ``subjects``). Random drops are seeded per subject
    (:class:`DropOrgansd`), so every model sees the same drops. Writes ``robustness_auroc.csv`` (AUROC per label
    and macro per condition) and ``robustness_subjects.csv`` (subjects and mean organs per condition).

    Returns:
        one dict per condition: ``condition``, ``auroc`` (per label), ``macro``, ``subjects``, ``mean_organs``.
    """
    network.eval()
    keys = [image_prefix + o for o in organs]
    subjects = [loaded[i] for i in range(len(loaded))]  # load (a Dataset transforms on access) once, not per condition
    results, rows = [], []
    for name, kw in missing_organ_conditions(organs, rates):
        drop = DropOrgansd(organs, seed=seed, dropped_key=None, image_prefix=image_prefix, **kw)
        items = [drop(dict(d)) for d in subjects]
        items = [{k: d[k] for k in (*keys, "present", "labels")} for d in items if bool(d["present"].any())]
        if not items:
            logger.warning("condition %r leaves no subject with an organ; skipped", name)
            continue
        probs, labels = [], []
        for batch in DataLoader(Dataset(items), batch_size=batch_size, shuffle=False, num_workers=0):
            present = batch["present"].to(device)
            images = {o: batch[image_prefix + o].to(device) for o in organs}
            probs.append(torch.sigmoid(network(images, present).float()).cpu())
            labels.append(batch["labels"].float())
        per, macro = multilabel_auroc(torch.cat(probs), torch.cat(labels))
        mean_organs = float(np.mean([float(d["present"].sum()) for d in items]))
        results.append({"condition": name, "auroc": per.tolist(), "macro": macro, "subjects": len(items),
                        "mean_organs": mean_organs})  # fmt: skip
        rows.append((name, per, macro))
        logger.info("robustness %-24s macro AUROC %.4f (%d subjects, %.2f organs each)", name, macro, len(items),
                    mean_organs)  # fmt: skip
    write_auroc_table(os.path.join(output_dir, "robustness_auroc.csv"), rows, label_names)
    with open(os.path.join(output_dir, "robustness_subjects.csv"), "w", encoding="utf-8") as f:
        f.write("condition,subjects,mean_organs\n")
        f.writelines(f"{r['condition']},{r['subjects']},{r['mean_organs']:.3f}\n" for r in results)
    return results
