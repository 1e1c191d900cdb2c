"""Training metrics into an MLflow run, by run id: the sink rank 0 logs through, under Ray Train
or standalone. Imports MLflow only (no Ray), so the standalone loop can use it where MLflow is
installed."""

from __future__ import annotations

import time

from mlflow import MlflowClient
from mlflow.entities import Metric

from pipelines.lineage import metric_name
from pipelines.redact import redact_tree


class MlflowSink:
    """Rank 0's view of a run: metrics by run id, batched per call; NaN (a task no sample of the
    window applied to) is left out."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(metric_name(k), float(v), now, step) for k, v in metrics.items() if v == v]
        )

    def log_config(self, ds_config: dict) -> None:
        self.client.log_dict(self.run_id, redact_tree(ds_config), "deepspeed_config.json")


def standalone_run(tracking_uri: str) -> MlflowSink:
    """A new run in the `crossmodal-standalone` experiment for a training run outside a pipeline."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("crossmodal-standalone") or client.get_experiment(
        client.create_experiment("crossmodal-standalone")
    )
    run_id = client.create_run(experiment.experiment_id, run_name="standalone-train").info.run_id
    return MlflowSink(tracking_uri, run_id)
