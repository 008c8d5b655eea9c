#!/usr/bin/env python
"""Throughput benchmarks of medfm's models against the MONAI model a user would pick instead.

Usage::

    python tools/bench.py fratmae [--size base|tiny] [--batch 2] [--steps N] [--warmup W] [--threads T]
                                  [--bf16/--no-bf16] [--data/--no-data]
    python tools/bench.py spad [--size base|tiny] [--batch 2] [--steps N] [--data/--no-data]
    python tools/bench.py panfm [--size base|tiny] [--batch 4] [--pool 16] [--buckets K] [--rates 0 0.2 0.4 0.6]
    python tools/bench.py panfm-eval [--subjects 32 128] [--batch 8]
    python tools/bench.py midol [--size base|tiny] [--batch 2] [--steps N] [--data/--no-data] [--workers 0 2]
    python tools/bench.py crop-cache [--shape 400 400 326] [--roi 160 32 192] [--samples 20]
    python tools/bench.py data [--cases 3] [--shape 400 400 326] [--workers 0 2 4] [--epochs 2]
    python tools/bench.py gpu [--device cuda] [--models fratmae spad midol] [--batch 16] [--bf16] [--compile]

One subcommand per model; add a ``_add_<model>`` parser builder in its ``tools/benchlib`` module and register
it in ``_SUBCOMMANDS``.
Everything runs in one process; stdout carries exactly one JSON object per case, human notes go to stderr.

Harness and cases live in ``tools/benchlib/`` (``harness`` and one module per subcommand family).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/, for benchlib when run as a script or loaded

from benchlib.data_paths import _add_crop_cache, _add_data_scale  # noqa: E402
from benchlib.device import _add_device  # noqa: E402
from benchlib.fratmae import _add_fratmae  # noqa: E402
from benchlib.harness import _STDOUT  # noqa: E402
from benchlib.midol import _add_midol  # noqa: E402
from benchlib.panfm import _add_panfm, _add_panfm_eval  # noqa: E402
from benchlib.spad import _add_spad  # noqa: E402

_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_fratmae, _add_spad, _add_panfm,
                                                                    _add_panfm_eval, _add_crop_cache, _add_midol,
                                                                    _add_data_scale, _add_device]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="model", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    sys.stdout = sys.stderr  # keep library prints off the JSON stream
    try:
        return args.func(args)
    finally:
        sys.stdout = _STDOUT


if __name__ == "__main__":
    sys.exit(main())
