"""MLflow experiment tracking for medfm's training configs (``--tracking <settings file>``).

MONAI's built-in ``--tracking mlflow`` logs each iteration's loss through ``from_engine(["loss"], first=True)``,
which gives a one-element tuple for the single dict that medfm's training iterations return, and MLflow refuses
it; and it records the executed config as an artifact only when ``output_dir`` is a ``$`` expression (a plain
``--output_dir /path`` yields a path that does not exist, and nothing is recorded). :func:`mlflow_settings` is
MONAI's settings with the loss read by :func:`medfm.engines.loss_scalar` and the artifact found by
:func:`executed_config`; write it to a file for the command line::

    python -m medfm.engines.tracking mlflow_tracking.json
    python -m monai.bundle run training --config_file … --tracking mlflow_tracking.json

Runs land in ``<output_dir>/mlruns.db`` (SQLite) with artifacts beside it, as MONAI's default does; install the
``mlflow`` extra (``pip install -e ".[mlflow]"``).
"""

from __future__ import annotations

import copy
import glob
import json
import os
import sys

__all__ = ["executed_config", "mlflow_settings"]


def executed_config(output_dir: str) -> str | None:
    """The newest ``config_<time>.json`` that MONAI's tracking wrote into ``output_dir`` (None when there is none)."""
    found = sorted(glob.glob(os.path.join(output_dir, "config_*.json")), key=os.path.getmtime)
    return found[-1] if found else None


def mlflow_settings() -> dict:
    """MONAI's default MLflow tracking settings with the trainer's per-iteration loss taken by ``loss_scalar`` and
    the executed config recorded as an artifact by the trainer and the evaluator."""
    from monai.bundle.utils import DEFAULT_MLFLOW_SETTINGS

    settings = copy.deepcopy(DEFAULT_MLFLOW_SETTINGS)
    settings["configs"]["trainer"]["output_transform"] = "$medfm.engines.loss_scalar"
    for engine in ("trainer", "evaluator"):
        settings["configs"][engine]["artifacts"] = "$medfm.engines.executed_config(@output_dir)"
    return settings


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m medfm.engines.tracking <settings.json>")
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        json.dump(mlflow_settings(), f, indent=4)
        f.write("\n")
