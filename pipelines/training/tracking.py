"""Training metrics into an MLflow run, by run id: the sink rank 0 logs through, under Ray Train
or standalone. Imports MLflow only (no Ray), so the standalone loop can use it where MLflow is
installed."""

from __future__ import annotations

import atexit
import threading
import time

from mlflow import MlflowClient
from mlflow.entities import Metric

from pipelines.lineage import metric_name
from pipelines.redact import redact_tree

# How long close() waits for buffered metrics to reach a server that is down (each attempt is
# itself bounded by MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT).
FLUSH_S = 120.0
RETRY_S = 5.0  # between two attempts once MLflow's own retries gave up
BATCH = 1000  # MLflow's limit of metrics per log_batch


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


class MlflowSink:
    """Rank 0's view of a run: metrics by run id; NaN (a task no sample of the window applied
    to) is left out.

    A step never waits for MLflow: `log` only appends to a buffer that a background thread
    writes, in order. While the server does not answer, points stay in the buffer and go out
    when it answers again; `close` flushes for at most `flush_s` seconds and says in one line
    what it could not write (the checkpoints are Ray Train's, on storage: nothing else is lost)."""

    def __init__(self, tracking_uri: str, run_id: str, flush_s: float = FLUSH_S, retry_s: float = RETRY_S):
        self.client, self.run_id, self.uri = MlflowClient(tracking_uri), run_id, tracking_uri
        self.flush_s, self.retry_s = flush_s, retry_s
        self.pending: list[Metric] = []
        self.written = 0
        self.outage_errors = 0  # failed attempts since the server last answered
        self.closing = False
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._drain, name="mlflow-sink", daemon=True)
        self.thread.start()
        atexit.register(self.close)  # standalone: whatever is buffered goes out before the process ends

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        points = [Metric(metric_name(k), float(v), now, step) for k, v in metrics.items() if v == v]
        with self.changed:
            self.pending.extend(points)
            self.changed.notify_all()

    def log_config(self, ds_config: dict) -> None:
        try:
            self.client.log_dict(self.run_id, redact_tree(ds_config), "deepspeed_config.json")
        except Exception as err:  # noqa: BLE001 - an artifact MLflow cannot take must not stop training
            print(f"train: deepspeed_config.json not logged to MLflow at {self.uri}: {one_line(err)}", flush=True)

    def _drain(self) -> None:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.pending or self.closing)
                if not self.pending:
                    return
                batch = self.pending[:BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as err:  # noqa: BLE001 - the server is down or refuses: keep the points, retry
                self.outage_errors += 1
                if self.outage_errors == 1:
                    print(
                        f"train: MLflow at {self.uri} does not answer ({one_line(err)}); training goes on, "
                        "its metrics wait in a buffer",
                        flush=True,
                    )
                with self.changed:  # wait before the next attempt, unless close() gives up waiting
                    self.changed.wait(self.retry_s)
                continue
            with self.changed:
                del self.pending[: len(batch)]  # log() only appends: the batch is still the buffer's head
                self.written += len(batch)
                self.changed.notify_all()
            if self.outage_errors:
                left = len(self.pending)
                print(f"train: MLflow at {self.uri} answers again; writing {left} buffered points", flush=True)
                self.outage_errors = 0

    def close(self) -> int:
        """Write what is buffered, for at most `flush_s`; returns the points left unwritten."""
        with self.changed:
            if self.closing:  # closed before (atexit after an explicit close): no second wait
                return len(self.pending)
            self.closing = True
            self.changed.notify_all()
            self.changed.wait_for(lambda: not self.pending, timeout=self.flush_s)
            left = list(self.pending)
        if left:
            steps = sorted({p.step for p in left})
            print(
                f"train: MLflow at {self.uri} did not answer for {self.flush_s:.0f} s: {len(left)} metric points of "
                f"steps {steps[0]}-{steps[-1]} not logged (the checkpoints are kept)",
                flush=True,
            )
        return len(left)


def standalone_run(tracking_uri: str) -> MlflowSink:
    """A new run in the `crossmodal-standalone` experiment for a training run outside a pipeline."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("crossmodal-standalone") or client.get_experiment(
        client.create_experiment("crossmodal-standalone")
    )
    run_id = client.create_run(experiment.experiment_id, run_name="standalone-train").info.run_id
    return MlflowSink(tracking_uri, run_id)
