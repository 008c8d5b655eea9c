"""Speed and memory switches of the pre-training configs: ``torch.compile`` and activation checkpointing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["speed_switches"]


def speed_switches(network: nn.Module, compile: bool | str | Mapping[str, Any] = False,
                   grad_checkpointing: bool = False) -> nn.Module:  # fmt: skip
    """Apply the configs' ``compile`` and ``grad_checkpointing`` switches to ``network`` in place and return it.

    Args:
        network: the training network (an EMA teacher pair or a plain model).
        compile: ``False``; ``True`` for ``torch.compile`` with its defaults (inductor); a backend name (e.g.
            ``"aot_eager"``); or ``torch.compile`` keyword arguments. The module is compiled in place
            (``nn.Module.compile``), so its ``state_dict`` keys, checkpoints and EMA updates are unchanged.
        grad_checkpointing: recompute the transformer blocks' activations in the backward pass (every submodule
            with ``set_grad_checkpointing``); drop-path draws are replayed, so losses and gradients are those of the
            plain network.

    Raises:
        ValueError: ``grad_checkpointing`` is asked of a network none of whose modules supports it, or ``compile``
            is of another type.
    """
    if grad_checkpointing:
        found = [m for m in network.modules() if callable(getattr(m, "set_grad_checkpointing", None))]
        if not found:
            raise ValueError(f"grad_checkpointing: {type(network).__name__} has no module with set_grad_checkpointing.")
        for m in found:
            m.set_grad_checkpointing(True)
    if compile is False or compile is None:
        return network
    if compile is True:
        kwargs: dict[str, Any] = {}
    elif isinstance(compile, str):
        kwargs = {"backend": compile}
    elif isinstance(compile, Mapping):
        kwargs = dict(compile)
    else:
        raise ValueError(f"compile must be a bool, a backend name or torch.compile arguments, got {compile!r}.")
    network.compile(**kwargs)
    return network
