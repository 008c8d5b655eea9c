"""The block stack shared by every ViT encoder of medfm, and the one layer-index convention of its backbones.

Feature API of every backbone (``ViTEncoder``, ``SpadViT``, ``PanFMEncoder``, ``SwinBackbone``), after timm's
``forward_intermediates``::

    final, intermediates = model.forward_intermediates(x, indices=(), *, <model inputs>, stop_early=False)

- ``x``: the model's image input (Pan-FM: the organ -> image mapping); inputs specific to a model follow as
  keywords (``ids_keep``, ``aniso_d``, ``present``, ``organ_mask``, ...).
- ``indices``: which blocks (Swin: stages) to return, resolved by :func:`resolve_indices`: a sequence of
  0-based indices, negative ones counting from the end, or an int ``n`` for the last ``n``. An index out of
  range is a ValueError.
- ``stop_early``: run only up to the deepest requested block; ``final`` is then the final norm of that block's
  output (Swin: that stage's map, un-normed; Pan-FM: not with ``return_attention``).
- returns ``final``, the final norm of the last output (a tensor shaped as the blocks' outputs; Pan-FM: its
  ``PanFMOutput``), and ``intermediates``, the raw (un-normed) outputs of the requested blocks, a list in the order
  asked (``[]`` for no indices).

Each model's ``forward`` keeps its own output (the ViT encoder: a dict of tokens and CLS, SPAD-ViT: the token
sequence, Pan-FM: ``PanFMOutput``, Swin: the pooled feature).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["TransformerTrunk", "resolve_indices"]


def resolve_indices(indices: int | Sequence[int], num_layers: int) -> list[int]:
    """Block indices in ``[0, num_layers)``, in the order asked.

    Args:
        indices: 0-based indices (negative count from the end: -1 is the last block), or an int ``n`` for the last
            ``n`` blocks.
        num_layers: blocks in the stack.

    Raises:
        ValueError: an index outside ``[-num_layers, num_layers)``, a count outside ``[0, num_layers]``, or an entry
            that is not an integer.
    """
    if isinstance(indices, bool):
        raise ValueError(f"indices must be an int count or a sequence of ints, got {indices!r}.")
    if isinstance(indices, int):
        if not 0 <= indices <= num_layers:
            raise ValueError(f"cannot take the last {indices} of {num_layers} blocks.")
        return list(range(num_layers - indices, num_layers))
    out = []
    for i in indices:
        try:
            if isinstance(i, bool):
                raise TypeError
            i = operator.index(i)
        except TypeError:
            raise ValueError(f"block indices must be integers, got {i!r} in {list(indices)}.") from None
        if not -num_layers <= i < num_layers:
            raise ValueError(
                f"block index {i} out of range for {num_layers} blocks (valid: {-num_layers} to {num_layers - 1})."
            )
        out.append(i % num_layers)
    return out


class TransformerTrunk(nn.ModuleList):
    """A stack of ``num_layers`` blocks with stochastic depth rising linearly from 0 to ``drop_path_rate`` (ViT,
    arXiv:2010.11929; stochastic depth, arXiv:1603.09382) and optional activation checkpointing.

    A ``ModuleList``: an encoder keeps it as ``self.blocks``, so parameters stay under ``blocks.<i>.*``.

    Args:
        make_block: ``make_block(drop_path) -> block``, called once per block in order (block ``i`` gets the rate
            ``drop_path_rate * i / (num_layers - 1)``); blocks map ``(B, N, C) -> (B, N, C)`` and take the keyword
            arguments given to :meth:`forward`.
        num_layers: blocks, at least 1.
        drop_path_rate: stochastic depth of the last block, in [0, 1).
    """

    def __init__(self, make_block: Callable[[float], nn.Module], num_layers: int, drop_path_rate: float = 0.0) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        super().__init__([make_block(r) for r in torch.linspace(0, drop_path_rate, num_layers).tolist()])
        self.grad_checkpointing = False

    def __getitem__(self, idx: int | slice) -> nn.Module | nn.ModuleList:  # type: ignore[override]
        """A block, or a plain ``nn.ModuleList`` of the blocks of a slice (``nn.ModuleList`` slices through
        ``self.__class__(...)``, which would call this class's ``__init__`` with a list as ``make_block``)."""
        if isinstance(idx, slice):
            return nn.ModuleList(list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, about a third more compute)."""
        self.grad_checkpointing = enable

    def resolve(self, indices: int | Sequence[int]) -> list[int]:
        """:func:`resolve_indices` for this stack."""
        return resolve_indices(indices, len(self))

    def forward(
        self, x: torch.Tensor, indices: int | Sequence[int] = (), stop_early: bool = False, **block_kwargs: Any
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """
        Args:
            x: (B, N, C) tokens.
            indices: blocks whose outputs to keep (see :func:`resolve_indices`).
            stop_early: run only up to the deepest block in ``indices``.
            block_kwargs: passed to every block (e.g. ``attn_mask``, ``rope``).

        Returns:
            the last output run (B, N, C) and the outputs (B, N, C) of the blocks in ``indices``, in that order.
        """
        wanted = self.resolve(indices)
        depth = max(wanted) + 1 if stop_early and wanted else len(self)
        keep = set(wanted)
        kept: dict[int, torch.Tensor] = {}
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i in range(depth):
            if use_checkpoint:
                x = checkpoint(self[i], x, use_reentrant=False, **block_kwargs)
            else:
                x = self[i](x, **block_kwargs)
            if i in keep:
                kept[i] = x
        return x, [kept[i] for i in wanted]
