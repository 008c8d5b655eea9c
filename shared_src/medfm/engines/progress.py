"""Console progress bar with the loss terms of each iteration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ignite.engine import Engine
from ignite.handlers import ProgressBar as _IgniteProgressBar

from .iteration import loss_terms

__all__ = ["ProgressBar"]


class ProgressBar:
    """ignite's tqdm progress bar, attachable from a bundle's ``train#handlers`` list, showing the values
    ``output_transform`` picks from the iteration output (default: every loss term and the learning rate).

    Args:
        persist: keep each epoch's bar on screen.
        output_transform: iteration output -> dict of scalars (or one scalar) to show.
    """

    def __init__(self, persist: bool = True, output_transform: Callable[[Any], Any] = loss_terms) -> None:
        self.bar = _IgniteProgressBar(persist=persist)
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:
        self.bar.attach(engine, output_transform=self.output_transform)
