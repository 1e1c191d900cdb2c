"""Rank 0's MLflow sink: a server that is down never stalls a step; what was logged meanwhile is
written when it answers again, and a server that never returns costs one line, not a hang."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.training.tracking import MlflowSink
from tests.conftest import REPO, free_port, start_until, stop_group


def server_env(tmp_path: Path) -> dict[str, str]:
    return os.environ | {
        "MLFLOW_BACKEND_STORE": f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS": str(tmp_path / "server" / "artifacts"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }


def start_server(tmp_path: Path, port: int):
    return start_until(
        [str(REPO / "infra" / "mlflow-server.sh"), str(port)],
        "Application startup complete",
        cwd=tmp_path,
        env=server_env(tmp_path),
    )


@pytest.fixture
def quick_failing_requests(monkeypatch):
    # One attempt per call: the test is about the sink's buffer, not MLflow's own retries.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


@pytest.mark.spawn
def test_metrics_logged_while_the_server_is_down_are_written_when_it_returns(tmp_path, quick_failing_requests):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    try:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("sink")).info.run_id
    finally:
        stop_group(server)  # down: every step below is logged while nothing answers
    sink = MlflowSink(uri, run_id, flush_s=60, retry_s=0.2)
    started = time.perf_counter()
    for step in range(1, 21):
        sink.log({"loss": 1.0 / step, "skipped": float("nan")}, step)
    assert time.perf_counter() - started < 0.5  # log() never waits for the server
    server = start_server(tmp_path, port)  # same store, same port
    try:
        assert sink.close() == 0
        history = MlflowClient(uri).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, 21))
        assert "skipped" not in MlflowClient(uri).get_run(run_id).data.metrics  # NaN left out
    finally:
        stop_group(server)


def test_a_server_that_never_returns_costs_one_line_not_a_hang(capsys, quick_failing_requests):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sink = MlflowSink(uri, "0" * 32, flush_s=1.0, retry_s=0.2)
    sink.log({"loss": 0.5}, 7)
    sink.log({"loss": 0.4}, 8)
    started = time.perf_counter()
    assert sink.close() == 2
    assert time.perf_counter() - started < 5
    said = capsys.readouterr().out
    assert f"MLflow at {uri} did not answer for 1 s: 2 metric points of steps 7-8 not logged" in said
    assert said.count("does not answer") == 1
