"""jobs.submit: a pipeline run submitted as a Ray job to a real Ray head with a dashboard."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from jobs import submit
from tests.conftest import DEMO_CONFIG, free_port, small_overrides, start_until, stop_group


def test_entrypoint_quotes_every_argument():
    command = submit.entrypoint("pipelines/configs/demo.yaml", ["storage.root=/data/my runs"], only="ingest,shard")
    assert shlex.split(command) == [
        "python",
        "-m",
        "pipelines",
        "run",
        "pipelines/configs/demo.yaml",
        "--set",
        "storage.root=/data/my runs",
        "--only",
        "ingest,shard",
    ]


def test_config_outside_the_project_is_refused(tmp_path):
    with pytest.raises(ValueError, match="must be inside the project folder"):
        submit.relative_config(str(tmp_path / "elsewhere.yaml"))


def test_config_mistake_fails_before_submitting(capsys):
    assert submit.main([str(DEMO_CONFIG), "--address", "http://127.0.0.1:1", "--set", "shard.splits=3"]) == 2
    assert "shard.splits: input should be a valid dictionary" in capsys.readouterr().err


@pytest.mark.spawn
@pytest.mark.ray
def test_submit_and_wait_runs_the_pipeline_on_the_cluster(tmp_path, capsys):
    dashboard = free_port()
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    head = start_until(
        [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={free_port()}",
            f"--dashboard-port={dashboard}",
            "--include-dashboard=true",
            "--num-cpus=4",
            # Its own agent port: the session's local cluster already holds the default one.
            f"--dashboard-agent-listen-port={free_port()}",
            "--object-store-memory=300000000",
            "--disable-usage-stats",
        ],
        "Ray runtime started",
        cwd=tmp_path,
        env=env,
    )
    try:
        overrides = [arg for o in small_overrides(tmp_path) for arg in ("--set", o)]
        code = submit.main(
            [str(DEMO_CONFIG), "--address", f"http://127.0.0.1:{dashboard}", *overrides, "--only", "ingest", "--wait"]
        )
        out = capsys.readouterr().out
        assert code == 0, out[-3000:]
        assert "[ingest] ran in" in out and "SUCCEEDED" in out
    finally:
        stop_group(head)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("crossmodal-demo")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`crossmodal.kind` = 'pipeline'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["crossmodal.plan"] == "ingest"


def test_the_nightly_is_submitted_as_its_own_entry_point():
    command = submit.entrypoint("pipelines/configs/nightly.yaml", ["nightly.warm_start=true"], nightly=True)
    assert shlex.split(command) == [
        "python",
        "-m",
        "jobs.nightly",
        "pipelines/configs/nightly.yaml",
        "--set",
        "nightly.warm_start=true",
    ]
    with pytest.raises(ValueError, match="--nightly runs the whole pipeline"):
        submit.entrypoint("pipelines/configs/nightly.yaml", only="train", nightly=True)


def test_relative_result_folders_become_absolute_on_a_local_cluster_and_are_refused_on_a_remote_one(monkeypatch):
    from pipelines.config import load_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(DEMO_CONFIG)  # storage.root runs/storage, sqlite store under runs
    here = Path.cwd()
    assert submit.absolute_paths(cfg, "http://127.0.0.1:8265") == [
        f"storage.root={here / 'runs' / 'storage'}",
        f"mlflow.local_store={here / 'runs'}",
    ]
    with pytest.raises(ValueError, match="storage.root runs/storage is relative: on the cluster it would land"):
        submit.absolute_paths(cfg, "http://head.internal:8265")
    shared = load_config(DEMO_CONFIG, ["storage.root=s3://bucket/x"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert submit.absolute_paths(shared, "http://head.internal:8265") == []
