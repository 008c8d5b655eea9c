"""TensorBoard bar plot of the teacher's attention share per organ (Pan-FM's dominant-organ diagnostic)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch.utils.tensorboard import SummaryWriter

__all__ = ["OrganAttentionPlot", "attention_bar_image"]

# 3 x 5 bitmap glyphs (rows top to bottom), enough to label organs and percentages without a font library
_GLYPHS = {
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111", "0": "111101101101111", "1": "010110010010111",
    "2": "110001010100111", "3": "110001010001110", "4": "101101111001001", "5": "111100110001110",
    "6": "011100111101111", "7": "111001010010010", "8": "111101111101111", "9": "111101111001110",
    "%": "101001010100101",
}  # fmt: skip
_PALETTE = np.array(
    [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75], [227, 119, 194],
     [127, 127, 127], [188, 189, 34], [23, 190, 207]], dtype=np.uint8,
)  # fmt: skip


def _draw_text(img: np.ndarray, text: str, top: int, center: int, scale: int = 2) -> None:
    """Write ``text`` (upper-cased; unknown characters blank) in black, centred on column ``center``."""
    step = 4 * scale
    left = center - (len(text) * step - scale) // 2
    for i, ch in enumerate(text.upper()):
        bits = _GLYPHS.get(ch)
        if bits is None:
            continue
        glyph = np.array([int(c) for c in bits], dtype=bool).reshape(5, 3)
        glyph = glyph.repeat(scale, 0).repeat(scale, 1)
        y0, x0 = top, left + i * step
        region = img[y0 : y0 + glyph.shape[0], x0 : x0 + glyph.shape[1]]
        region[glyph[: region.shape[0], : region.shape[1]]] = 0


def attention_bar_image(
    shares: Sequence[float], labels: Sequence[str], plot_height: int = 120, bar_width: int = 40
) -> np.ndarray:
    """Bar plot of attention shares: one bar per organ (height proportional to its share, the tallest bar
    filling the plot), its percentage above it, the first four letters of its name below, and a grey line at
    the uniform share ``1 / len(shares)``.

    Returns:
        (H, W, 3) uint8 RGB image (white background).
    """
    if len(shares) != len(labels) or not shares:
        raise ValueError(f"need one label per share, got {len(shares)} shares and {len(labels)} labels.")
    values = np.clip(np.asarray(shares, dtype=np.float64), 0.0, None)
    top_value = max(float(values.max()), 1.0 / len(values))
    margin_top, margin_bottom, gap = 16, 16, 8
    height = margin_top + plot_height + margin_bottom
    width = len(values) * (bar_width + gap) + gap
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    base = margin_top + plot_height  # first row below the plot
    for i, (v, name) in enumerate(zip(values, labels)):
        x0 = gap + i * (bar_width + gap)
        h = round(plot_height * v / top_value)
        img[base - h : base, x0 : x0 + bar_width] = _PALETTE[i % len(_PALETTE)]
        _draw_text(img, f"{round(100 * v)}%", max(0, base - h - 12), x0 + bar_width // 2)
        _draw_text(img, name[:4], base + 3, x0 + bar_width // 2)
    img[base - round(plot_height / len(values) / top_value), ::3] = 96  # dotted line at the uniform share
    return img


class OrganAttentionPlot:
    """Every ``every`` iterations, write to TensorBoard (tag ``tag``) a bar plot of the teacher's mean attention
    share per organ over those iterations (``engine.state.output["organ_attention"]``, from
    :class:`~medfm.engines.PanFMPretrainIteration`), then start a new window. Pan-FM's SGM should flatten it.

    The shares are token-normalised (:func:`medfm.masking.organ_attention_share`: mean attention per token,
    normalised over the present organs), so attention that is uniform per token gives every organ the same share
    and the plot's line at ``1 / len(organs)`` is the uniform level, whatever the organs' token counts.

    Args:
        log_dir: TensorBoard folder (sharing the stats handler's is fine).
        organs: organ names, in the network's order.
        every: iterations per plot.
        tag: image tag.
    """

    def __init__(self, log_dir: str, organs: Sequence[str], every: int = 100, tag: str = "organ_attention") -> None:
        if every < 1:
            raise ValueError(f"every must be positive, got {every}.")
        self.log_dir = log_dir
        self.organs = tuple(organs)
        self.every = every
        self.tag = tag
        self.writer: SummaryWriter | None = None
        self._sum = torch.zeros(len(self.organs), dtype=torch.float64)
        self._count = 0
        self.last_share: list[float] | None = None  # the shares of the last plot

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.accumulate)
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.write)
        engine.add_event_handler(Events.COMPLETED, self.close)

    def running_share(self) -> list[float]:
        """Mean attention share per organ since the last plot."""
        return (self._sum / max(1, self._count)).tolist()

    def accumulate(self, engine: Engine) -> None:
        attention = engine.state.output["organ_attention"]
        if attention.shape[-1] != len(self.organs):
            raise ValueError(f"organ_attention has {attention.shape[-1]} organs, expected {len(self.organs)}.")
        self._sum += attention.detach().double().sum(0).cpu()
        self._count += attention.shape[0]

    def write(self, engine: Engine) -> None:
        if self._count == 0:
            return
        if self.writer is None:
            self.writer = SummaryWriter(log_dir=self.log_dir)
        self.last_share = self.running_share()
        image = attention_bar_image(self.last_share, self.organs)
        self.writer.add_image(self.tag, image, engine.state.iteration, dataformats="HWC")
        self.writer.flush()
        self._sum.zero_()
        self._count = 0

    def close(self, engine: Engine | None = None) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
