"""MLflow tracking of a short demo pre-training run: per-iteration losses and the executed config recorded."""

from __future__ import annotations

import json
import math

import pytest

from medfm.data import generate_synthetic_petct
from medfm.engines import mlflow_settings

from ..bundles.helpers import workflow

mlflow = pytest.importorskip("mlflow")


def test_mlflow_records_every_iteration_loss_and_the_config(tmp_path):
    from mlflow.tracking import MlflowClient

    data, out = tmp_path / "data", tmp_path / "out"
    generate_synthetic_petct(str(data), num_cases=2, shape=(48, 32, 96), spacing=(10.0, 10.0, 20.0), seed=5)
    wf = workflow("fratmae_petct", ["train.json", "demo.json"], dataset_dir=str(data), output_dir=str(out), epochs=2,
                  tracking=mlflow_settings())  # fmt: skip
    wf.initialize()
    wf.run()
    iterations = wf.parser.get_parsed_content("train#trainer").state.iteration
    wf.finalize()
    client = MlflowClient(f"sqlite:///{out}/mlruns.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    assert [m.step for m in history] == list(range(1, iterations + 1))
    assert all(math.isfinite(m.value) and m.value > 0 for m in history)
    local = client.download_artifacts(runs[0].info.run_id, "", str(tmp_path / "artifacts"))
    configs = [json.loads(p.read_text(encoding="utf-8")) for p in (tmp_path / "artifacts").rglob("*.json")]
    assert local and any(c.get("epochs") == 2 for c in configs), "the executed config is not among the artifacts"
