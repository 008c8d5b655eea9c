"""Generic checks over every network class the bundles' configs build (their ``_target_`` under
``medfm.networks``), at tiny sizes: every trainable parameter gets a gradient, a bf16-autocast forward runs on
the CPU, and activation checkpointing gives the eager outputs and gradients."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from medfm.masking import random_masking
from medfm.networks.blocks import SwinBackbone, swin, trunk
from medfm.networks.nets import (
    FratMAE,
    FratMAEClassifier,
    FratMAESegmenter,
    MIDoLClassifier,
    MIDoLSegmenter,
    MIDoLSelfDistill,
    PanFMClassifier,
    PanFMSelfDistill,
    SpadPatchDiscriminator,
    SpadViTClassifier,
    SpadViTMIM,
    SpadViTSegmenter,
    SpadVT,
)
from medfm.transforms import PromptTokenizer

ROOT = Path(__file__).resolve().parents[2]
VIT = {"patch_size": 4, "hidden_size": 16, "num_layers": 2, "num_heads": 2, "mlp_dim": 32, "drop_path_rate": 0.1}
SPAD = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "mlp_dim": 24, "pos_embed_shape": (2, 2, 2),
        "drop_path_rate": 0.1}  # fmt: skip
SWIN = {"img_size": 16, "patch_size": 2, "window_size": 4, "embed_dim": 8, "depths": (1, 1), "num_heads": (2, 2)}
ORGANS = ("brain", "heart")
ORGAN_SHAPES = {"brain": (8, 8, 8), "heart": (4, 8, 8)}


def _x(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(len(shape) + sum(shape)))


def _sq(*ts: torch.Tensor) -> torch.Tensor:
    return sum(t.float().square().mean() for t in ts)  # type: ignore[return-value]


def _fratmae(m: nn.Module) -> torch.Tensor:
    pet, ct = _x(2, 1, 8, 8, 8), _x(2, 1, 8, 8, 8) + 1
    mask = random_masking(2, 8, 0.5, torch.Generator().manual_seed(0))
    text = PromptTokenizer()(["<tracer> 18F FDG <age> 61", "<tracer> 18F PSMA <sex> M"])
    a, b = m(pet, ct, {"pet": mask}, text), m(pet, ct, {"ct": mask}, text)  # each decoder reconstructs once
    return _sq(a["pet_pred"], b["ct_pred"], a["image_embed"], a["text_embed"])


def _panfm_inputs() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    images = {o: _x(3, 1, *s) for o, s in ORGAN_SHAPES.items()}
    return images, torch.tensor([[1, 1], [1, 0], [0, 1]], dtype=torch.bool)


def _panfm_pretrain(m: nn.Module) -> torch.Tensor:
    images, present = _panfm_inputs()
    out = m(images, present, torch.tensor([[0, 1], [0, 0], [1, 0]], dtype=torch.bool))
    return _sq(out["cls_logits"], out["patch_logits"])


def _spad_mim(m: nn.Module) -> torch.Tensor:
    mask = torch.tensor([[True, False, True, False]])
    return _sq(m(_x(1, 3, 16, 32, 32), 0, mask)["logits"])


def _spad_vt(m: nn.Module) -> torch.Tensor:
    rec, q = m(_x(1, 3, 16, 32, 32) * 2 - 1, 0)
    return _sq(rec) + q.usage_loss + q.token_entropy


def _midol_pretrain(m: nn.Module) -> torch.Tensor:
    out = m([_x(2, 3, 16, 16), _x(2, 3, 16, 16).flip(-1), _x(2, 3, 8, 8)])
    return _sq(*out["logits"], *out["router_logits"])


# class name -> (tiny model, scalar to differentiate, parameters without gradient by design)
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], torch.Tensor], tuple[str, ...]]] = {
    "FratMAE": (
        lambda: FratMAE(**VIT, decoder_hidden_size=16, decoder_num_layers=1, decoder_num_heads=2, decoder_mlp_dim=32,
                        text_width=16, text_num_layers=1, text_num_heads=2, embed_dim=8),  # fmt: skip
        _fratmae,
        (),
    ),
    "FratMAESegmenter": (
        lambda: FratMAESegmenter(out_channels=2, feature_size=4, **VIT),
        lambda m: _sq(m(_x(1, 2, 8, 8, 8))),
        (),
    ),
    "FratMAEClassifier": (
        lambda: FratMAEClassifier(num_classes=2, mlp_hidden=8, **VIT),
        lambda m: _sq(m(_x(2, 2, 8, 8, 8))),
        (),
    ),
    "SpadViTMIM": (lambda: SpadViTMIM(num_codes=8, **SPAD), _spad_mim, ()),
    "SpadViTSegmenter": (
        lambda: SpadViTSegmenter(3, feature_layers=(0, 1, 1, 1), decoder_channels=(4, 4, 8, 8, 8, 8), **SPAD),
        lambda m: _sq(m(_x(1, 3, 1, 64, 64), 5)),
        ("encoder.norm.",),  # the segmenter reads block outputs through its own norms
    ),
    "SpadViTClassifier": (lambda: SpadViTClassifier(3, **SPAD), lambda m: _sq(m(_x(1, 3, 16, 32, 32), 0)), ()),
    "SpadVT": (lambda: SpadVT(channels=(8, 16, 16), num_codes=8, code_dim=8), _spad_vt, ()),
    "SpadPatchDiscriminator": (
        lambda: SpadPatchDiscriminator(channels=(8, 16), norm_groups=8),
        lambda m: _sq(m(_x(1, 3, 16, 32, 32), 0)),
        (),
    ),
    "PanFMSelfDistill": (
        lambda: PanFMSelfDistill(ORGANS, ORGAN_SHAPES, **VIT, out_dim=8, patch_out_dim=6, head_hidden_dim=8,
                                 head_bottleneck_dim=4),  # fmt: skip
        _panfm_pretrain,
        (),
    ),
    "PanFMClassifier": (
        lambda: PanFMClassifier(3, organs=ORGANS, organ_shapes=ORGAN_SHAPES, **VIT),
        lambda m: _sq(m(*_panfm_inputs())),
        ("encoder.mask_token",),  # hides organs in pre-training only
    ),
    "SwinBackbone": (lambda: SwinBackbone(**SWIN), lambda m: _sq(m(_x(2, 3, 16, 16))), ()),
    "MIDoLSelfDistill": (
        lambda: MIDoLSelfDistill(SwinBackbone(**SWIN), 16, num_experts=3, top_k=1, out_dim=8, hidden_dim=8),
        _midol_pretrain,
        (),
    ),
    "MIDoLClassifier": (lambda: MIDoLClassifier(num_classes=3, **SWIN), lambda m: _sq(m(_x(2, 3, 16, 16))), ()),
    "MIDoLSegmenter": (
        lambda: MIDoLSegmenter(out_channels=2, feature_size=4, **SWIN),
        lambda m: _sq(m(_x(2, 3, 16, 16))),
        (),
    ),
}


def _config_targets() -> set[str]:
    """Class names of every ``_target_`` under ``medfm.networks`` in the bundles' configs."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            target = node.get("_target_")
            if isinstance(target, str) and target.startswith("medfm.networks"):
                found.add(target.rsplit(".", 1)[-1])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for path in sorted(ROOT.glob("bundles/*/configs/*.json")):
        walk(json.loads(path.read_text()))
    return found


def test_every_bundle_network_is_covered():
    targets = _config_targets()
    assert targets, "no network _target_ found in the bundles' configs"
    assert targets <= set(CASES), f"networks built by the configs without a case here: {sorted(targets - set(CASES))}"


def _build(name: str) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor], tuple[str, ...]]:
    make, run, unused = CASES[name]
    torch.manual_seed(0)
    return make().train(), run, unused


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_reach_every_trainable_parameter(name):
    model, run, unused = _build(name)
    torch.manual_seed(1)
    run(model).backward()
    missing = [n for n, g in _grads(model).items() if (g is None or not torch.isfinite(g).all())]
    assert [n for n in missing if not n.startswith(unused)] == []
    for prefix in unused:  # the exceptions are real parameters that indeed get nothing
        assert any(n.startswith(prefix) for n in missing), prefix


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_autocast_forward_on_cpu(name):
    model, run, _ = _build(name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(run(model))


@pytest.mark.parametrize("name", sorted(CASES))
def test_activation_checkpointing_equals_eager(name, monkeypatch):
    model, run, _ = _build(name)
    switchable = [m for m in model.modules() if callable(getattr(m, "set_grad_checkpointing", None))]
    if not switchable:
        pytest.skip(f"{name} has no transformer blocks to checkpoint")
    calls = []

    def counted(fn, *args, **kwargs):
        calls.append(fn)
        return checkpoint(fn, *args, **kwargs)

    for module in (trunk, swin):  # the two places that checkpoint blocks
        monkeypatch.setattr(module, "checkpoint", counted)
    results = []
    for enable in (False, True):
        for m in switchable:
            m.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        calls.clear()
        torch.manual_seed(1)  # the same drop-path and gate-noise draws
        loss = run(model)
        loss.backward()
        results.append((loss.detach(), _grads(model)))
        assert bool(calls) == enable  # the switch indeed recomputes blocks (and only when on)
    (eager, g_eager), (ckpt, g_ckpt) = results
    torch.testing.assert_close(ckpt, eager, rtol=1e-5, atol=1e-6)
    for n, g in g_eager.items():
        if g is None:
            assert g_ckpt[n] is None, n
        else:
            torch.testing.assert_close(g_ckpt[n], g, rtol=1e-4, atol=1e-6, msg=n)
