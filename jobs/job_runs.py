"""The MLflow parent run a submitted job created: where the job logs, how to find the run (its
tag `crossmodal.job_id`, set from $CROSSMODAL_JOB_ID by pipelines/lineage.py) and its link."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

POLL_S = 2.0
# A lookup is a side show of the command: a server that does not answer must not hold it up
# for MLflow's default 7 retries with exponential backoff.
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def job_tracking_uri(mlflow_cfg) -> tuple[str | None, str]:
    """The tracking URI the job will log to, as seen from here; else None and why not.

    The job resolves it as pipelines.lineage.tracking_uri does, but in its working directory
    on the cluster: a relative local store is somewhere this machine cannot look."""
    if mlflow_cfg.tracking_uri:
        return mlflow_cfg.tracking_uri, ""
    if os.environ.get("MLFLOW_TRACKING_URI"):  # jobs.submit forwards it to the job
        return os.environ["MLFLOW_TRACKING_URI"], ""
    store = Path(mlflow_cfg.local_store).expanduser()
    if not store.is_absolute():
        return None, (
            f"the job logs to a sqlite store in its working directory on the cluster (mlflow.local_store "
            f"'{mlflow_cfg.local_store}' is relative); export MLFLOW_TRACKING_URI (make cluster-up prints it) "
            "to find its runs from here"
        )
    return f"sqlite:///{store.resolve() / 'mlflow.db'}", ""


@contextmanager
def _quick_http():
    saved = {key: os.environ.get(key) for key in QUICK_HTTP}
    os.environ.update({key: os.environ.get(key) or value for key, value in QUICK_HTTP.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def find_parent_run(uri: str, experiment: str, job_id: str):
    """The job's pipeline run, or None while there is none (or the store cannot be read)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if "'" in job_id or "\\" in job_id:
        return None  # not an id we made, and it would break the filter string
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).exists():
        return None  # the job has not created the store yet; opening it here would
    try:
        with _quick_http():
            client = MlflowClient(uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                return None
            runs = client.search_runs(
                [found.experiment_id],
                f"tags.`crossmodal.job_id` = '{job_id}'",  # the pipeline's run, or a quiet night's
                max_results=1,
            )
    except (MlflowException, OSError):
        return None
    return runs[0] if runs else None


def run_link(uri: str, run) -> str:
    """Where to open the run: the server's UI page, or how to serve a local store."""
    experiment, run_id = run.info.experiment_id, run.info.run_id
    # MLflow 3.17's UI keeps a global GenAI / Model training switch (GenAI in a new browser)
    # that the experiment's kind tag does not override; the URL parameter does.
    page = f"#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{page}"
    if uri.startswith("sqlite:///") and uri.endswith("/mlflow.db"):
        folder = Path(uri[len("sqlite:///") :]).parent
        return f"make ui RUNS={folder}, then http://127.0.0.1:5000/{page}  (store {uri})"
    return f"mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/{page}"


def describe(uri: str, run) -> str:
    return f"MLflow run {run.info.run_id} ({run.info.status}): {run_link(uri, run)}"


def wait_for_run(uri: str, experiment: str, job_id: str, timeout_s: float, job_done: Callable[[], bool]):
    """Poll until the job's run exists, the job has ended, or timeout_s: never forever."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = job_done()  # asked first: a run the job made before ending is found below
        run = find_parent_run(uri, experiment, job_id)
        if run is not None or done or time.monotonic() >= deadline:
            return run
        time.sleep(POLL_S)


class RunWatcher(threading.Thread):
    """Prints the run's link as soon as it appears, while the main thread streams the logs."""

    def __init__(self, uri: str, experiment: str, job_id: str, echo: Callable[[str], None]):
        super().__init__(name=f"run-watcher-{job_id}", daemon=True)
        self.uri, self.experiment, self.job_id, self.echo = uri, experiment, job_id, echo
        self.run_found = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(POLL_S):
            found = find_parent_run(self.uri, self.experiment, self.job_id)
            if found is not None:
                self.run_found = found
                self.echo(describe(self.uri, found))
                return

    def finish(self):
        """Stop polling; look once more (the run may end after the last poll); return the run."""
        self._halt.set()
        self.join()
        if self.run_found is None:
            self.run_found = find_parent_run(self.uri, self.experiment, self.job_id)
            if self.run_found is not None:
                self.echo(describe(self.uri, self.run_found))
        return self.run_found
