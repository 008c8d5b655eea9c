"""Initialise downstream networks from a pre-training checkpoint (FratMAE encoders, SPAD-ViT encoder)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "filter_fratmae_encoders",
    "filter_spad_vit_encoder",
    "init_from_pretraining",
    "init_midol_from_pretraining",
    "init_panfm_from_pretraining",
    "init_spad_vit_from_pretraining",
    "count_matching",
    "with_legacy_buffers",
    "load_checkpoint_file",
    "load_fratmae_encoders",
    "load_midol_backbone",
    "load_panfm_encoder",
    "load_spad_vit_encoder",
    "load_weights",
]

logger = logging.getLogger(__name__)


def load_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint", resave_hint: str | None = None) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with clear errors: a missing file is a
    FileNotFoundError and an unreadable one a ValueError, both naming ``what`` and the path; ``resave_hint``
    (e.g. ``"torch.save(ckpt['model'], ...)"``) tells how to keep the weights alone of a trusted checkpoint that
    pickles other objects."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        hint = (
            f" If it is a trusted checkpoint that pickles other objects, re-save its weight dict alone ({resave_hint})."
            if resave_hint
            else ""
        )
        raise ValueError(f"cannot read {what} {path} with weights_only=True: {e}.{hint}") from e


def _read_state(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    state = load_checkpoint_file(path, "pre-training checkpoint")
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # a training checkpoint (model, optimizer, ...) rather than bare weights
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict.")
    return state


def filter_fratmae_encoders(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep FratMAE's encoder tensors (``encoders.pet.*``, ``encoders.ct.*``); every FratMAE model (pre-training,
    segmentation, staging) names them so. Decoders, text encoder, projections and task heads are dropped;
    ``module.`` prefixes (DDP) are removed first.
    """
    out = {}
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k.startswith(("encoders.pet.", "encoders.ct.")):
            out[k] = v
    return out


def filter_spad_vit_encoder(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SPAD-ViT encoder tensors named as in the downstream models (``encoder.*``).

    A MIM pre-training state (``cls_token``, ``blocks.*``, ... at the top level) is prefixed with ``encoder.``
    after dropping ``mask_token`` and ``mim_head.*``; a downstream model's state keeps its ``encoder.*``.
    ``module.`` prefixes (DDP) are removed first.
    """
    state = {(k.removeprefix("module.")): v for k, v in state.items()}
    if any(k.startswith("encoder.") for k in state):
        return {k: v for k, v in state.items() if k.startswith("encoder.")}
    return {f"encoder.{k}": v for k, v in state.items() if k != "mask_token" and not k.startswith("mim_head.")}


def count_matching(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], keys=None) -> int:
    """How many of ``keys`` (default: every tensor of ``own``) ``state`` holds under the same name and shape."""
    keys = list(own) if keys is None else list(keys)
    return sum(1 for k in keys if k in state and tuple(state[k].shape) == tuple(own[k].shape))


def _load_part(
    network: nn.Module, path: str | os.PathLike, state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], what: str
) -> dict[str, list[str]]:
    own = network.state_dict()
    wanted = [k for k in own if k.startswith(prefixes)]
    matched = count_matching(own, state, wanted)
    if not state or not any(k.startswith(prefixes) for k in state):
        raise ValueError(
            f"{path} is not a {what} checkpoint: it matches {matched} of the network's {len(wanted)} encoder tensors "
            f"(it holds no {' / '.join(p + '*' for p in prefixes)} tensors)."
        )
    missing = [k for k in wanted if k not in state]
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in wanted
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or wrong:
        raise ValueError(
            f"{path} does not fit this network's encoders: it matches {matched} of {len(wanted)} encoder tensors; "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]}); was it "
            "pre-trained with the same encoder size and patch size?"
        )
    for k in wanted:
        own[k] = state[k].to(own[k].dtype)
    network.load_state_dict(own)
    report = {"loaded": wanted, "not_in_checkpoint": [k for k in own if k not in wanted]}
    logger.info(
        "loaded %d encoder tensors from %s; %d tensors (task decoder/head) keep their initialisation",
        len(report["loaded"]), path, len(report["not_in_checkpoint"]),
    )  # fmt: skip
    return report


def load_fratmae_encoders(network: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Copy the PET and CT encoders of a FratMAE pre-training checkpoint into a downstream network.

    Accepts the final ``model.pt`` or a training checkpoint (``checkpoint_iter=<n>.pt``) of pre-training, or the
    weights of a fine-tuned FratMAE segmenter or classifier (their encoders too). Every encoder tensor
    of the network must be found with the same shape; otherwise nothing is loaded and a ValueError names
    the file and the first differences (a checkpoint of another model or of another encoder size).

    Returns:
        ``{"loaded": [...], "not_in_checkpoint": [...]}`` — network tensors taken from the checkpoint, and
        network tensors left as initialised (the task decoder or head).
    """
    state = filter_fratmae_encoders(_read_state(path))
    return _load_part(network, path, state, ("encoders.pet.", "encoders.ct."), "FratMAE pre-training")


def load_spad_vit_encoder(network: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Copy a SPAD-ViT encoder (MIM pre-training checkpoint, converted release, or a fine-tuned SPAD-ViT model)
    into a downstream SPAD-ViT model's ``encoder``; same checks and report as :func:`load_fratmae_encoders`."""
    state = filter_spad_vit_encoder(_read_state(path))
    return _load_part(network, path, state, ("encoder.",), "SPAD-ViT")


def init_from_pretraining(
    network: nn.Module, path: str | os.PathLike | None, loader=load_fratmae_encoders
) -> nn.Module:
    """``network`` with its encoders loaded from ``path`` (see :func:`load_fratmae_encoders`); with no path
    (None, ``""`` or ``"none"``, which a command line can pass) it is returned as initialised (the paper's
    "Baseline" row: no pre-training)."""
    if path is not None and str(path).strip().lower() not in ("", "none"):
        loader(network, path)
    else:
        logger.info("no pre-training checkpoint given: encoders start from random initialisation")
    return network


def init_spad_vit_from_pretraining(network: nn.Module, path: str | os.PathLike | None) -> nn.Module:
    """:func:`init_from_pretraining` for SPAD-ViT downstream models (:func:`load_spad_vit_encoder`)."""
    return init_from_pretraining(network, path, load_spad_vit_encoder)


def with_legacy_buffers(network: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` plus, for every submodule of ``network`` with a ``legacy_state(prefix)`` method whose weights are in
    ``state`` but whose newer buffers are not (a checkpoint written before they existed), those buffers at the values
    the checkpoint was trained with (e.g. :meth:`medfm.networks.nets.PanFMEncoder.legacy_state`)."""
    out = dict(state)
    for name, module in network.named_modules():
        if hasattr(module, "legacy_state"):
            prefix = f"{name}." if name else ""
            legacy = module.legacy_state(prefix)
            if any(k.startswith(prefix) for k in out) and not any(k in out for k in legacy):
                out.update(legacy)
    return out


def load_weights(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """``network`` with every tensor loaded from ``path`` (bare weights or a training checkpoint's ``model``),
    strictly: a missing, unexpected or differently shaped tensor is a ValueError naming the file (buffers that a
    checkpoint predates are filled by :func:`with_legacy_buffers`)."""
    state = {k.removeprefix("module."): v for k, v in _read_state(path).items()}
    state = with_legacy_buffers(network, state)
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit {type(network).__name__}: it matches {count_matching(own, state)} of {len(own)} "
            f"tensors; {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]})."
        )
    network.load_state_dict(state)
    logger.info("loaded %d tensors of %s from %s", len(own), type(network).__name__, path)
    return network


def load_panfm_encoder(network: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Copy a Pan-FM encoder into a downstream model's ``encoder``: from a pre-training checkpoint (the EMA
    teacher's encoder, ``teacher.encoder.*``, as DINO evaluates) or from a fine-tuned model (``encoder.*``);
    same checks and report as :func:`load_fratmae_encoders`. A checkpoint without the encoder's ``pos_scale`` and
    mean-image buffers (written before they existed) loads with scale 1 and zero means, as it was trained."""
    state = {k.removeprefix("module."): v for k, v in _read_state(path).items()}
    if any(k.startswith("teacher.encoder.") for k in state):
        state = {
            "encoder." + k[len("teacher.encoder.") :]: v for k, v in state.items() if k.startswith("teacher.encoder.")
        }
    return _load_part(network, path, with_legacy_buffers(network, state), ("encoder.",), "Pan-FM")


def init_panfm_from_pretraining(network: nn.Module, path: str | os.PathLike | None) -> nn.Module:
    """:func:`init_from_pretraining` for Pan-FM downstream models (:func:`load_panfm_encoder`)."""
    return init_from_pretraining(network, path, load_panfm_encoder)


def load_midol_backbone(network: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Copy an M-IDoL Swin backbone into a downstream model's ``backbone``: from a pre-training checkpoint (the
    EMA teacher's, ``teacher.backbone.*``, as the reference keeps), a converted release (bare Swin keys) or a
    fine-tuned model (``backbone.*``); same checks and report as :func:`load_fratmae_encoders`."""
    state = {k.removeprefix("module."): v for k, v in _read_state(path).items()}
    if any(k.startswith("teacher.backbone.") for k in state):
        state = {
            "backbone." + k[len("teacher.backbone.") :]: v
            for k, v in state.items()
            if k.startswith("teacher.backbone.")
        }
    elif not any(k.startswith("backbone.") for k in state):
        state = {"backbone." + k: v for k, v in state.items()}
    return _load_part(network, path, state, ("backbone.",), "M-IDoL")


def init_midol_from_pretraining(network: nn.Module, path: str | os.PathLike | None) -> nn.Module:
    """:func:`init_from_pretraining` for M-IDoL downstream models (:func:`load_midol_backbone`)."""
    return init_from_pretraining(network, path, load_midol_backbone)
