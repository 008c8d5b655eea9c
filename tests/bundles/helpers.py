"""Shared helpers for the bundle tests: run configs in-process or through the CLI, read what a run wrote."""

from __future__ import annotations

import ast
import contextlib
import gc
import glob
import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch
from monai.bundle import ConfigWorkflow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEMA = os.path.join(os.path.dirname(REPO), "shared", "schemas", "meta_schema_20240725.json")


def configs(bundle: str, *names: str) -> list[str]:
    return [os.path.join(REPO, "bundles", bundle, "configs", n) for n in names]


def config_list(bundle: str, *names: str) -> str:
    """The ``--config_file`` argument that merges a bundle's config files in order: ``"['/abs/a.json', …]"``."""
    return "[" + ",".join(f"'{p}'" for p in configs(bundle, *names)) + "]"


def workflow(bundle: str, names: list[str], workflow_type: str = "train", **override) -> ConfigWorkflow:
    files = configs(bundle, *names)
    return ConfigWorkflow(
        config_file=files,
        meta_file=configs(bundle, "metadata.json")[0],
        logging_file=False,
        workflow_type=workflow_type,
        **override,
    )


def run_cli(args: list[str], cwd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True, text=True,
        encoding="utf-8", errors="replace", timeout=timeout,
    )  # fmt: skip


def cli_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["--epochs", "2", "--output_dir", "/x"]`` -> ``{"epochs": 2, "output_dir": "/x"}``: values read as Python
    literals where they are one, as the command line's parser does, else kept as strings."""
    if len(overrides) % 2 or not all(k.startswith("--") for k in overrides[::2]):
        raise ValueError(f"overrides must be --key value pairs, got {list(overrides)}")
    out = {}
    for key, value in zip(overrides[::2], overrides[1::2]):
        try:
            out[key[2:]] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key[2:]] = value
    return out


def run_bundle(bundle: str, cwd, names: list[str], *overrides: str, mode: str | None = "training", cli: bool = False):
    """Run a bundle's configs (merged in order) with ``--key value`` overrides, in ``cwd``, asserting success.

    ``cli=True``: ``python -m monai.bundle run [mode] --config_file … <overrides>`` in a subprocess (returns the
    ``CompletedProcess``); otherwise the same run in this process through ``ConfigWorkflow`` (run id ``mode`` or
    ``run``), which saves an interpreter start per run; one CLI run per bundle keeps the command line covered."""
    if cli:
        args = ["run", mode] if mode else ["run"]
        res = run_cli([*args, "--config_file", config_list(bundle, *names), *overrides], cwd=str(cwd))
        assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
        return res
    here = os.getcwd()
    os.chdir(str(cwd))
    try:
        wf = ConfigWorkflow(config_file=configs(bundle, *names), meta_file=configs(bundle, "metadata.json")[0],
                            logging_file=False, run_id=mode or "run", **cli_overrides(overrides))  # fmt: skip
        wf.initialize()
        wf.run()
        wf.finalize()
    finally:
        os.chdir(here)
        gc.collect()
    return None


def zoo_checks_and_export(bundle: str, ckpt_file: str, input_shape: list[int], cwd) -> str:
    """``verify_net_in_out`` and a traced ``ckpt_export`` of ``ckpt_file`` on ``inference.json`` +
    ``demo_inference.json``, called in this process as the model zoo's CI calls them (each raises on failure);
    returns the TorchScript file. (``verify_metadata`` of every bundle is in ``test_configs.py``.)"""
    from monai.bundle import ckpt_export, verify_net_in_out

    meta = configs(bundle, "metadata.json")[0]
    files = configs(bundle, "inference.json", "demo_inference.json")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=files)
    ts = os.path.join(str(cwd), "model.ts")
    ckpt_export(net_id="network_def", filepath=ts, ckpt_file=ckpt_file, meta_file=meta, config_file=files,
                use_trace=True, input_shape=list(input_shape))  # fmt: skip
    assert os.path.isfile(ts), f"ckpt_export wrote no {ts}"
    return ts


def event_tags(log_dir: str) -> tuple[set[str], set[str]]:
    """Scalar and image tags written to TensorBoard event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = set(), set()
    for f in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        acc = EventAccumulator(f, size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    return scalars, images


def error_text(exc: BaseException) -> str:
    """Every message along an exception's chain (MONAI wraps transform and config errors)."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def one_process_group_env(monkeypatch) -> None:
    """The environment torchrun would set for a one-process group on a free local port."""
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():  # fmt: skip
        monkeypatch.setenv(k, v)


def save_untrained(bundle: str, names: list[str], net_id: str, path, **override) -> str:
    """Save the randomly initialised (seed 0) weights of ``net_id`` from ``bundle``'s merged ``names`` to ``path``:
    the weights a run starts from when only their sameness across runs matters. Returns ``path`` as a string."""
    wf = workflow(bundle, names, **override)
    torch.manual_seed(0)
    torch.save(wf.parser.get_parsed_content(net_id).state_dict(), str(path))
    return str(path)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_jobs(jobs: dict[str, dict], root, timeout: int = 600) -> dict[str, str]:
    """Run several bundle runs one after another in ONE ``torchrun --nproc_per_node=2`` launch on CPU (gloo), which
    saves the start of two interpreters and torchrun per run (``ddp_jobs.py``). ``jobs``: name -> ``{"config_file":
    [...], "overrides": {...}, "run_id": "training"}`` (``run_id`` optional). Asserts a zero exit code; returns each
    job's log, both ranks' output one after the other, as one ``torchrun -m monai.bundle run`` of it would print."""
    root = str(root)
    log_dir = os.path.join(root, "ddp_logs")
    os.makedirs(log_dir, exist_ok=True)
    spec = [{"name": name, "config_file": job["config_file"], "run_id": job.get("run_id", "training"),
             "overrides": job.get("overrides", {}), "cwd": root, "log_dir": log_dir}
            for name, job in jobs.items()]  # fmt: skip
    jobs_file = os.path.join(root, "ddp_jobs.json")
    with open(jobs_file, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_jobs.py"), jobs_file]  # fmt: skip
    res = subprocess.run(
        cmd, cwd=root, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout
    )
    if res.returncode != 0:  # from the failed job's report (ddp_jobs.py), else the end of the output
        out = res.stdout + res.stderr
        at = out.find(" failed on rank ")
        start = out.rfind("job ", 0, at) if at >= 0 else max(0, len(out) - 8000)
        raise AssertionError(f"torchrun exited with {res.returncode}:\n" + out[start : start + 8000])
    logs = {}
    for name in jobs:
        parts = []
        for rank in (0, 1):
            with open(os.path.join(log_dir, f"{name}.rank{rank}.log"), encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
        logs[name] = "".join(parts)
    return logs


@contextlib.contextmanager
def captured_logs(name: str = "medfm"):
    """The messages logged under logger ``name`` (INFO and up) while the block runs: what a command-line run of the
    same configs prints from that logger."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
