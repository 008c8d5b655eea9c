"""Import the SPAD-Nets authors' released checkpoints (PUMIT release v1) into medfm's modules.

- ViT ``pumit-b.ckpt`` (a Lightning checkpoint, weights under ``state_dict``): EVA-02-style names with separate
  ``attn.{q,k,v}_proj`` and ``mlp.{w1,w2,w3,ffn_ln}``. medfm fuses q/k/v into ``attn.qkv`` and w1/w2 into
  ``mlp.fc1`` (gate first); everything else keeps its name.
- Tokenizer ``simple-soft.ckpt`` (a Fabric checkpoint, weights under ``model``): ``encoder.*``,
  ``quantize.{proj,embedding}.*``, ``decoder.*``; :class:`medfm.networks.nets.SpadVT` uses the same names.

Every source tensor is either used or reported; every target tensor must be filled with the right shape.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .pretrained import load_checkpoint_file

__all__ = ["ConversionReport", "convert_pumit_tokenizer", "convert_pumit_vit", "read_release_checkpoint"]

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
# names that change (per block); the rest are copied by name
_VIT_RENAMES = {
    "mlp.w3.weight": "mlp.fc2.weight",
    "mlp.w3.bias": "mlp.fc2.bias",
    "mlp.ffn_ln.weight": "mlp.norm.weight",
    "mlp.ffn_ln.bias": "mlp.norm.bias",
}
_IGNORED = re.compile(r"(^|\.)rope\.|(^|\.)freqs_(cos|sin)$|^tokenizer\.")


@dataclass
class ConversionReport:
    """What a conversion did: tensors written, source tensors not used, target tensors not filled, shape errors."""

    converted: dict[str, torch.Tensor] = field(default_factory=dict)
    unused_source: list[str] = field(default_factory=list)
    missing_target: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unused_source or self.missing_target or self.shape_mismatch)

    def summary(self) -> str:
        lines = [f"converted {len(self.converted)} tensors"]
        for name, items in (
            ("source tensors not used", self.unused_source),
            ("target tensors not in the checkpoint", self.missing_target),
            ("shape mismatches", self.shape_mismatch),
        ):
            lines.append(f"{name}: {len(items)}" + ("".join(f"\n  {k}" for k in items[:20])))
        return "\n".join(lines)


def read_release_checkpoint(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """The weight dict of a release checkpoint: under ``key`` if given, else ``state_dict`` (Lightning),
    ``model`` (Fabric) or the top level. Read with ``weights_only=True``."""
    obj = load_checkpoint_file(path, resave_hint="torch.save(ckpt['state_dict'] or ckpt['model'], ...)")
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of weights.")
    for k in [key] if key else ["state_dict", "model"]:
        if k in obj and isinstance(obj[k], Mapping):
            obj = obj[k]
            break
    else:
        if key:
            raise KeyError(f"{path} has no '{key}' entry (it has {sorted(obj)[:10]}).")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"{path} holds no tensors under {key or 'state_dict/model/top level'}.")
    return state


def _finish(report: ConversionReport, target: nn.Module) -> ConversionReport:
    own = target.state_dict()
    for k, v in list(report.converted.items()):
        if k not in own:
            report.unused_source.append(f"{k} (no such tensor in {type(target).__name__})")
            del report.converted[k]
        elif own[k].shape != v.shape:
            report.shape_mismatch.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
    report.missing_target = [k for k in own if k not in report.converted]
    return report


def convert_pumit_vit(state: Mapping[str, torch.Tensor], target: nn.Module) -> ConversionReport:
    """Map a released SPAD-ViT state dict onto ``target`` (:class:`SpadViTMIM` for the whole release, or
    :class:`SpadViT`, for which ``mask_token`` / ``mim_head.*`` are reported as unused)."""
    state = {k.removeprefix("model."): v for k, v in state.items()}
    report = ConversionReport()
    used: set[str] = set()
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    for i in blocks:
        p = f"blocks.{i}."
        qkv = [state.get(p + f"attn.{n}_proj.weight") for n in "qkv"]
        if all(t is not None for t in qkv):
            report.converted[p + "attn.qkv.weight"] = torch.cat(qkv, 0)
            used.update(p + f"attn.{n}_proj.weight" for n in "qkv")
        for part in ("weight", "bias"):
            w1, w2 = state.get(p + f"mlp.w1.{part}"), state.get(p + f"mlp.w2.{part}")
            if w1 is not None and w2 is not None:
                report.converted[p + f"mlp.fc1.{part}"] = torch.cat((w1, w2), 0)
                used.update((p + f"mlp.w1.{part}", p + f"mlp.w2.{part}"))
        for old, new in _VIT_RENAMES.items():
            if p + old in state:
                report.converted[p + new] = state[p + old]
                used.add(p + old)
    for k, v in state.items():
        if k in used:
            continue
        if _IGNORED.search(k):
            used.add(k)  # derived buffers and the frozen tokenizer: not weights of the ViT
            continue
        report.converted[k] = v
        used.add(k)
    return _finish(report, target)


def convert_pumit_tokenizer(state: Mapping[str, torch.Tensor], target: nn.Module) -> ConversionReport:
    """Map a released SPAD-VT (``simple-soft.ckpt``) weight dict onto :class:`SpadVT` (same names)."""
    report = ConversionReport()
    for k, v in state.items():
        k = k.removeprefix("model.")
        if k.startswith(("encoder.", "quantize.", "decoder.")):
            report.converted[k] = v
        else:
            report.unused_source.append(k)
    return _finish(report, target)
