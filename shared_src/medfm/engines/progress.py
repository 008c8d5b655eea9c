"""Console progress bar with the loss terms of each iteration."""

from __future__ import annotations

from ignite.engine import Engine
from ignite.handlers import ProgressBar as _IgniteProgressBar

from .iteration import loss_terms

__all__ = ["ProgressBar"]


class ProgressBar:
    """ignite's tqdm progress bar, attachable from a bundle's ``train#handlers`` list, showing every loss
    term and the learning rate.

    Args:
        persist: keep each epoch's bar on screen.
    """

    def __init__(self, persist: bool = True) -> None:
        self.bar = _IgniteProgressBar(persist=persist)

    def attach(self, engine: Engine) -> None:
        self.bar.attach(engine, output_transform=loss_terms)
