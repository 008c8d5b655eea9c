"""Import the M-IDoL authors' released backbone (``M-IDoL.pth``, LYH-hh/M-IDoL) into
:class:`medfm.networks.blocks.SwinBackbone`.

The release holds the pre-trained Swin-B with Microsoft's key names under a ``backbone.`` prefix (the
authors' README strips it). A DINO-style training checkpoint nests the same keys under ``teacher`` / ``student``
(``backbone.*`` plus the projector ``head.*``), possibly with DistributedDataParallel's ``module.``; the teacher is
taken by default, as M-IDoL keeps only the teacher Swin. The official Microsoft Swin checkpoints (weights under
``model``) map the same way.

``relative_position_index`` and ``attn_mask`` are geometry, rebuilt by the model: they are dropped and listed as
derived. Every other source tensor is used or reported (``head.*`` as unused); every target tensor must be
filled with the right shape.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from .pretrained import load_checkpoint_file
from .pumit_release import ConversionReport, _finish

__all__ = ["MidolConversionReport", "convert_midol_backbone", "read_midol_checkpoint", "select_midol_state"]

_PREFIXES = ("module.", "backbone.")
_DERIVED = ("relative_position_index", "attn_mask")


@dataclass
class MidolConversionReport(ConversionReport):
    """:class:`ConversionReport` plus the derived buffers dropped from the source (not errors) and the ``head.*``
    keys (also in ``unused_source``: ``ok`` is False with a head; ``backbone_ok`` ignores it)."""

    derived: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)

    @property
    def backbone_ok(self) -> bool:
        """Every backbone tensor matched: ``ok`` except for the (expected) unused ``head.*`` keys."""
        return not (self.missing_target or self.shape_mismatch) and len(self.unused_source) == len(self.head)

    def summary(self) -> str:
        return (
            super().summary()
            + f"\nof which head (projector/classifier, not the backbone): {len(self.head)}"
            + f"\nderived buffers dropped (rebuilt from the geometry): {len(self.derived)}"
        )


def select_midol_state(
    obj: Mapping[str, object], which: Literal["teacher", "student"] = "teacher"
) -> dict[str, torch.Tensor]:
    """The weight dict inside a loaded checkpoint: ``obj[which]`` (DINO-style teacher/student), else
    ``state_dict`` / ``model``, else the top level; non-tensor entries are dropped."""
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}.")
    for key in (which, "state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]  # type: ignore[assignment]
            break
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_midol_checkpoint(
    path: str | os.PathLike, which: Literal["teacher", "student"] = "teacher"
) -> dict[str, torch.Tensor]:
    """Load ``path`` once with ``weights_only=True`` and return :func:`select_midol_state` of it.

    (``medfm.networks.pumit_release.read_release_checkpoint`` does not descend into ``teacher``/``student`` without
    being told the key, and the flat release has no such key; both read through ``load_checkpoint_file``.)"""
    obj = load_checkpoint_file(path, resave_hint="torch.save(ckpt['teacher'], ...)")
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path} holds a {type(obj).__name__}, not a dict of weights.")
    state = select_midol_state(obj, which)
    if not state:
        raise ValueError(
            f"{path} holds no tensors under {which}/state_dict/model/top level (it has {sorted(obj)[:10]})."
        )
    return state


def convert_midol_backbone(
    state: Mapping[str, object], target: nn.Module, which: Literal["teacher", "student"] = "teacher"
) -> MidolConversionReport:
    """Map an M-IDoL (or Microsoft Swin) state dict onto ``target`` (a :class:`SwinBackbone`).

    Args:
        state: flat weight dict, or a checkpoint with ``teacher``/``student`` (or ``state_dict``/``model``) entries.
        target: the module to fill; only its state-dict names and shapes are read.
        which: the network taken from a teacher/student checkpoint.

    Returns:
        the report; ``report.converted`` loads into ``target`` with ``strict=True`` when ``report.backbone_ok``
        (``head.*`` keys, of M-IDoL's projector or Microsoft's classifier, are listed as unused).
    """
    report = MidolConversionReport()
    for key, value in select_midol_state(state, which).items():
        name = key
        while name.startswith(_PREFIXES):
            name = name.removeprefix("module.").removeprefix("backbone.")
        if name.rsplit(".", 1)[-1] in _DERIVED:
            report.derived.append(key)
        elif name.startswith("head."):
            report.unused_source.append(f"{key} (head, not the backbone)")
            report.head.append(key)
        elif name in report.converted:
            report.unused_source.append(f"{key} (duplicates {name})")
        else:  # names the target lacks are reported as unused by _finish
            report.converted[name] = value
    return _finish(report, target)  # type: ignore[return-value]
