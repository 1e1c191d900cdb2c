"""infra/mlflow-server.sh serves a tracking server the pipeline logs to exactly as to the local store."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.config import load_config
from pipelines.runner import run_pipeline
from tests.conftest import DEMO_CONFIG, REPO, free_port, small_overrides, start_until, stop_group
from tests.pipelines import toy_stages


@pytest.mark.spawn
def test_pipeline_against_a_real_tracking_server(tmp_path, ray_cluster):
    port = free_port()
    env = os.environ | {
        "MLFLOW_BACKEND_STORE": f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS": str(tmp_path / "server" / "artifacts"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    server = start_until(
        [str(REPO / "infra" / "mlflow-server.sh"), str(port)], "Application startup complete", cwd=tmp_path, env=env
    )
    try:
        uri = f"http://127.0.0.1:{port}"
        cfg = load_config(DEMO_CONFIG, small_overrides(tmp_path) + [f"mlflow.tracking_uri={uri}"])
        first = run_pipeline(cfg, stages=toy_stages.STAGES, echo=lambda line: None)
        second = run_pipeline(cfg, stages=toy_stages.STAGES, echo=lambda line: None)
        assert [s.state for s in first.stages] == ["ran"] * 3
        assert [s.state for s in second.stages] == ["reused"] * 3
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("crossmodal-demo")
        assert experiment.artifact_location.startswith("mlflow-artifacts:")  # proxied by the server
        config_yaml = Path(client.download_artifacts(first.run_id, "config.yaml", str(tmp_path))).read_text()
        assert f"tracking_uri: {uri}" in config_yaml
        assert any((tmp_path / "server" / "artifacts").rglob("config.yaml"))
        assert not (tmp_path / "runs").exists()  # nothing fell back to a local store
    finally:
        stop_group(server)
