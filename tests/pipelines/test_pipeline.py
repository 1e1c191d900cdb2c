"""The DAG on a real local Ray cluster with a real MLflow store: order, selection, resume, failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from pipelines.runner import run_pipeline
from pipelines.storage import Storage
from tests.conftest import DEMO_CONFIG, REPO, small_overrides
from tests.pipelines import toy_stages


def stage_runs(outcome) -> dict:
    """The nested MLflow runs of a pipeline run, by stage name."""
    client = MlflowClient(outcome.tracking_uri)
    parent = client.get_run(outcome.run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{outcome.run_id}'")
    return {run.data.tags["crossmodal.stage"]: run for run in children}


def states(outcome) -> dict[str, str]:
    return {s.name: s.state for s in outcome.stages}


def run(cfg, **options):
    return run_pipeline(cfg, stages=toy_stages.STAGES, echo=lambda line: None, **options)


def test_stages_run_in_order_and_pass_outputs(demo_config, ray_cluster):
    outcome = run(demo_config)
    assert outcome.status == "FINISHED"
    assert [s.name for s in outcome.stages] == ["first", "second", "third"]
    assert Storage(outcome.by_name()["third"].output_uri).read_bytes("data.txt") == b"first+second+third"
    runs = stage_runs(outcome)
    assert {name: r.data.tags["crossmodal.state"] for name, r in runs.items()} == {n: "ran" for n in runs}
    parent = MlflowClient(outcome.tracking_uri).get_run(outcome.run_id)
    assert parent.data.tags["crossmodal.plan"] == "first,second,third"
    assert parent.data.tags["crossmodal.config_hash"] == demo_config.digest()
    for tag in ("crossmodal.git_commit", "crossmodal.host", "crossmodal.ray_address"):
        assert parent.data.tags[tag]
    assert parent.data.params["shard.samples_per_shard"] == "32"
    second = runs["second"]
    assert second.data.tags["crossmodal.input.first.data"] == outcome.by_name()["first"].output_uri
    assert second.data.tags["crossmodal.output_uri"] == outcome.by_name()["second"].output_uri
    assert second.data.metrics["length"] == len("first+second")


def test_failed_stage_stops_dependants_and_rerun_redoes_only_failed_and_later(demo_config, ray_cluster):
    storage = Storage(demo_config.storage.root)
    storage.write_bytes(b"", "fail-second")
    failed = run(demo_config)
    assert failed.status == "FAILED"
    assert states(failed) == {"first": "ran", "second": "failed", "third": "skipped"}
    assert failed.failure.error == "RuntimeError: second failed on purpose"
    client = MlflowClient(failed.tracking_uri)
    assert client.get_run(failed.run_id).info.status == "FAILED"
    runs = stage_runs(failed)
    assert set(runs) == {"first", "second"}  # third never started
    assert runs["second"].info.status == "FAILED"
    assert runs["second"].data.tags["crossmodal.error"] == "RuntimeError: second failed on purpose"
    error_file = client.download_artifacts(runs["second"].info.run_id, "error.txt")
    assert "second failed on purpose" in open(error_file).read()

    storage.fs.delete_file(storage.path("fail-second"))
    resumed = run(demo_config)
    assert resumed.status == "FINISHED"
    assert states(resumed) == {"first": "reused", "second": "ran", "third": "ran"}
    again = stage_runs(resumed)
    assert again["first"].data.tags["crossmodal.reused_from"] == runs["first"].info.run_id
    assert all(r.info.status == "FINISHED" for r in again.values())


def test_rerun_reuses_and_only_from_force_select(demo_config, ray_cluster):
    first = run(demo_config)
    assert states(first) == {"first": "ran", "second": "ran", "third": "ran"}
    assert stage_runs(first)["third"].data.metrics["forced"] == 0.0
    assert states(run(demo_config)) == {"first": "reused", "second": "reused", "third": "reused"}
    redo = run(demo_config, from_stage="second")
    assert states(redo) == {"first": "reused", "second": "ran", "third": "ran"}
    # A stage told to redo its work must not resume state an earlier run left (train: checkpoints).
    assert {name: r.data.metrics.get("forced") for name, r in stage_runs(redo).items()} == {
        "first": 0.0,
        "second": 1.0,
        "third": 1.0,
    }
    assert states(run(demo_config, only=["third"])) == {"first": "reused", "second": "reused", "third": "reused"}
    forced = run(demo_config, only=["third"], force=True)
    assert states(forced) == {"first": "reused", "second": "reused", "third": "ran"}
    assert stage_runs(forced)["third"].data.metrics["forced"] == 1.0
    # A changed config section changes that stage's identity and everything downstream of it.
    changed = demo_config.model_copy(update={"shard": demo_config.shard.model_copy(update={"samples_per_shard": 5})})
    assert states(run(changed)) == {"first": "reused", "second": "ran", "third": "ran"}


def test_deleted_output_is_not_reused(demo_config, ray_cluster):
    first = run(demo_config).by_name()["first"]
    Storage(first.output_uri).fs.delete_dir(Storage(first.output_uri).path())
    assert states(run(demo_config)) == {"first": "ran", "second": "reused", "third": "reused"}


def test_only_needs_finished_inputs(demo_config, ray_cluster):
    outcome = run(demo_config, only=["second"])
    assert outcome.status == "FAILED"
    assert states(outcome) == {"first": "failed", "second": "skipped"}
    assert "stage 'first' has no finished run" in outcome.failure.error


@pytest.mark.spawn
def test_driver_killed_mid_stage_then_rerun_keeps_finished_stages(demo_config, ray_cluster, tmp_path):
    storage = Storage(demo_config.storage.root)
    storage.write_bytes(b"", "block-second")
    overrides = sum((["--set", o] for o in small_overrides(tmp_path)), [])
    driver = subprocess.Popen(
        [sys.executable, "-m", "tests.pipelines.toy_stages", str(DEMO_CONFIG), *[o for o in overrides if o != "--set"]],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    for line in driver.stdout:  # returns when the stage says it is inside `second`
        seen.append(line)
        if "second: started and blocking" in line:
            break
    else:
        raise AssertionError("driver ended before reaching the second stage:\n" + "".join(seen))
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    storage.fs.delete_file(storage.path("block-second"))

    resumed = run(demo_config)
    assert states(resumed) == {"first": "reused", "second": "ran", "third": "ran"}
    client = MlflowClient(resumed.tracking_uri)
    experiment = client.get_run(resumed.run_id).info.experiment_id
    killed = [
        r
        for r in client.search_runs([experiment], "tags.`crossmodal.kind` = 'pipeline'")
        if r.info.run_id != resumed.run_id
    ]
    assert [r.info.status for r in killed] == ["KILLED"]
    killed_stages = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{killed[0].info.run_id}'")
    assert {r.data.tags["crossmodal.stage"]: r.info.status for r in killed_stages} == {
        "first": "FINISHED",
        "second": "KILLED",
    }


def test_from_and_only_together_redo_only_the_selection(demo_config, ray_cluster):
    run(demo_config)
    assert states(run(demo_config, from_stage="first", only=["third"])) == {
        "first": "reused",
        "second": "reused",
        "third": "ran",
    }


def test_a_driver_error_between_stages_fails_the_pipeline_and_closes_its_runs(demo_config, ray_cluster, monkeypatch):
    from pipelines.lineage import Lineage

    original = Lineage.finish_stage

    def broken(self, run_id, state, *args, **kwargs):
        if self.client.get_run(run_id).data.tags["crossmodal.stage"] == "second":
            raise OSError("tracking store went away")
        return original(self, run_id, state, *args, **kwargs)

    monkeypatch.setattr(Lineage, "finish_stage", broken)
    try:
        run(demo_config)
    except OSError:
        pass
    else:
        raise AssertionError("the driver error must surface")
    monkeypatch.setattr(Lineage, "finish_stage", original)
    client = MlflowClient(f"sqlite:///{demo_config.mlflow.local_store}/mlflow.db")
    experiment = client.get_experiment_by_name(demo_config.mlflow.experiment).experiment_id
    [parent] = client.search_runs([experiment], "tags.`crossmodal.kind` = 'pipeline'")
    assert parent.info.status == "FAILED"
    children = {
        r.data.tags["crossmodal.stage"]: r
        for r in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    }
    assert children["first"].info.status == "FINISHED"
    assert children["second"].info.status == "FAILED"
    assert children["second"].data.tags["crossmodal.error"] == "OSError: tracking store went away"


def test_a_stage_that_must_rerun_but_is_not_selected_says_what_changed(demo_config, ray_cluster, tmp_path):
    from pipelines.config import load_config

    finished = run(demo_config)
    previous = stage_runs(finished)["first"].info.run_id[:8]
    changed = load_config(DEMO_CONFIG, small_overrides(tmp_path) + ["ingest.demo.seed=5"])
    outcome = run(changed, only=["second"])
    assert outcome.status == "FAILED" and states(outcome) == {"first": "failed", "second": "skipped"}
    assert (
        f"(its config changed since run {previous}: ingest.demo.seed 0 -> 5) and is not selected"
        in outcome.failure.error
    )
