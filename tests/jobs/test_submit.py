"""jobs.submit: the job command and its checks before submitting (on a real head: test_ray_jobs.py)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from jobs import submit
from tests.conftest import DEMO_CONFIG


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
