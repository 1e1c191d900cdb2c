"""The `crossmodal` command end to end, in fresh processes (their own local Ray cluster)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import DEMO_CONFIG, small_overrides


def crossmodal(*args, tmp_path):
    command = [sys.executable, "-m", "pipelines", *args]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def with_overrides(tmp_path, *extra):
    return [arg for o in small_overrides(tmp_path) + list(extra) for arg in ("--set", o)]


@pytest.mark.spawn
@pytest.mark.ray
def test_run_ingest_shard_then_rerun_reuses_both(tmp_path):
    first = crossmodal("run", str(DEMO_CONFIG), "--only", "ingest,shard", *with_overrides(tmp_path), tmp_path=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "FINISHED: ingest ran" in first.stdout and "shard ran" in first.stdout
    assert "make ui" in first.stdout
    second = crossmodal("run", str(DEMO_CONFIG), "--only", "ingest,shard", *with_overrides(tmp_path), tmp_path=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "FINISHED: ingest reused, shard reused" in second.stdout
    assert "Ray cluster at" not in second.stdout  # nothing to run: no cluster started

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("crossmodal-demo")
    assert experiment.artifact_location == (tmp_path / "runs" / "mlartifacts").as_uri()
    parents = client.search_runs(
        [experiment.experiment_id], "tags.`crossmodal.kind` = 'pipeline'", order_by=["attributes.start_time ASC"]
    )
    assert [p.info.status for p in parents] == ["FINISHED", "FINISHED"]
    for parent, state in zip(parents, ("ran", "reused")):
        children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert sorted((c.data.tags["crossmodal.stage"], c.data.tags["crossmodal.state"]) for c in children) == [
            ("ingest", state),
            ("shard", state),
        ]

    status = crossmodal("status", "--tracking-uri", f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", tmp_path=tmp_path)
    assert status.returncode == 0
    assert status.stdout.splitlines()[1].endswith("ingest: reused, shard: reused")
    stages = crossmodal("stages", str(DEMO_CONFIG), *with_overrides(tmp_path), tmp_path=tmp_path)
    lines = stages.stdout.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["ingest", "shard", "prepare", "train", "evaluate"]
    assert ["finished (run" in line for line in lines] == [True, True, False, False, False] and lines[2].endswith(
        "to run"
    )


@pytest.mark.spawn
@pytest.mark.ray
def test_failing_stage_exits_nonzero_with_one_line(tmp_path):
    result = crossmodal(
        "run",
        str(DEMO_CONFIG),
        *with_overrides(tmp_path, "ingest.source=folder", f"ingest.path={tmp_path / 'nowhere'}"),
        tmp_path=tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"crossmodal: stage 'ingest' failed: ingest.path {tmp_path / 'nowhere'}: no such file or folder"
    )
    assert "FAILED: ingest failed, shard skipped" in result.stdout


@pytest.mark.spawn
def test_config_mistake_exits_2_before_anything_runs(tmp_path):
    result = crossmodal("run", str(DEMO_CONFIG), "--set", "shard.samples_per_shard=zero", tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "crossmodal: error: --set shard.samples_per_shard=zero: shard.samples_per_shard: "
        "input should be a valid integer, unable to parse string as an integer (got 'zero')"
    )
    assert not (tmp_path / "runs").exists()
    unknown = crossmodal("run", str(DEMO_CONFIG), "--only", "ingest,trian", tmp_path=tmp_path)
    assert unknown.returncode == 2
    assert (
        unknown.stderr.strip()
        == "crossmodal: error: unknown stage 'trian' (stages: ingest, shard, prepare, train, evaluate, "
        "distill, prune, quantize, register)"
    )


def test_a_command_line_mistake_is_one_line_naming_the_argument(capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (
        "crossmodal run: error: the following arguments are required: config (see crossmodal run --help)\n"
    )
