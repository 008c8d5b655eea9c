"""Several bundle runs, one after another, in each process of one ``torchrun`` launch.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/bundles/ddp_jobs.py jobs.json

``jobs.json`` is a list of ``{"name", "config_file", "run_id", "overrides", "cwd", "log_dir"}``. Each job is
``monai.bundle.run`` (what ``python -m monai.bundle run`` calls) with its own process group: the configs' finalize
destroys the group, and a group set up again through the same store would meet the old one's keys, so every job
rendezvouses on a store of its own. Rank 0 serves it on a port free when the job starts (not when the launch
started: the launch's earlier jobs and other processes on the machine open and close ports meanwhile) and hands the
number to rank 1 in ``<log_dir>/<name>.<torchrun run id>.port``. Each rank's output during a job
(file descriptors 1 and 2, so the log handlers' lines and anything a library prints) goes to
``<log_dir>/<name>.rank<rank>.log``. A failing job stops the launch with a non-zero exit.
"""

from __future__ import annotations

import json
import os
import sys
import time

from helpers import free_port  # tests/bundles/helpers.py: torchrun runs this file with its folder on sys.path


def _job_port(job: dict, rank: int, timeout: float = 300.0) -> int:
    """Rank 0: a port free now, written for rank 1; rank 1: the port rank 0 wrote (waiting for it)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")  # a launch's own files: none left by an earlier launch
    path = os.path.join(job["log_dir"], f"{job['name']}.{run_id}.port")
    if rank == 0:
        port = free_port()
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(str(port))
        os.replace(path + ".tmp", path)
        return port
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0 wrote no port for job {job['name']} in {timeout:.0f} s ({path})")
        time.sleep(0.05)
    with open(path, encoding="utf-8") as f:
        return int(f.read())


def _run_job(job: dict, rank: int) -> None:
    from monai.bundle import run

    os.environ["MASTER_PORT"] = str(_job_port(job, rank))
    log_path = os.path.join(job["log_dir"], f"{job['name']}.rank{rank}.log")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    here = os.getcwd()
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            os.chdir(job["cwd"])
            try:
                run(run_id=job["run_id"], config_file=job["config_file"], **job["overrides"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        os.chdir(here)


def main(jobs_file: str) -> None:
    rank = int(os.environ["RANK"])
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # each job's rank 0 serves its own store
    with open(jobs_file, encoding="utf-8") as f:
        jobs = json.load(f)
    for job in jobs:
        try:
            _run_job(job, rank)
        except BaseException as exc:
            path = os.path.join(job["log_dir"], f"{job['name']}.rank{rank}.log")
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    output = f.read()[-4000:]
            except OSError:  # failed before its output was redirected (e.g. waiting for the job's port)
                output = f"{type(exc).__name__}: {exc}"
            sys.stderr.write(f"job {job['name']} failed on rank {rank}; its output:\n{output}\n")
            raise


if __name__ == "__main__":
    main(sys.argv[1])
