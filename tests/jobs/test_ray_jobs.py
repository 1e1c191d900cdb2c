"""crossmodal submit / crossmodal jobs against a real local cluster that infra/local/cluster.sh
starts (a Ray head with its dashboard and an MLflow server, each a process group), one for the
file; its last test stops it and checks that nothing of it is left."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from ray.job_submission import JobSubmissionClient

from jobs import cli, job_runs, ray_jobs, submit
from pipelines.config import MlflowConfig
from tests.conftest import DEMO_CONFIG, REPO, free_port, small_overrides

SCRIPT = REPO / "infra" / "local" / "cluster.sh"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def wait_terminal(client, job_id: str, timeout_s: float = 240.0) -> str:
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job_id).value)) not in TERMINAL:
        assert time.monotonic() < deadline, f"{job_id} still {status}"
        time.sleep(1.0)
    return status


def living(groups: set[int]) -> list[str]:
    """Processes (not zombies) whose process group or session is one of `groups`."""
    found = subprocess.run(["ps", "-eo", "pid=,pgid=,sid=,stat=,args="], capture_output=True, text=True).stdout
    rows = [line.split(None, 4) for line in found.splitlines()]
    return [" ".join(r) for r in rows if not r[3].startswith("Z") and ({int(r[1]), int(r[2])} & groups)]


# -- without a cluster -------------------------------------------------------------------------
def test_job_ids_are_ours_and_sortable():
    first, second = submit.new_job_id(), submit.new_job_id()
    assert re.fullmatch(r"crossmodal-\d{8}T\d{6}Z-[0-9a-f]{6}", first) and first != second


def test_the_tracking_uri_the_job_uses(tmp_path, monkeypatch):
    assert job_runs.job_tracking_uri(MlflowConfig(tracking_uri="http://mlflow:5000"))[0] == "http://mlflow:5000"
    assert job_runs.job_tracking_uri(MlflowConfig(local_store=str(tmp_path)))[0] == f"sqlite:///{tmp_path}/mlflow.db"
    uri, why_not = job_runs.job_tracking_uri(MlflowConfig(local_store="runs"))
    assert uri is None and "working directory on the cluster" in why_not
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")  # forwarded to the job
    assert job_runs.job_tracking_uri(MlflowConfig(local_store="runs"))[0] == "http://127.0.0.1:5001"


def test_run_links():
    run = SimpleNamespace(info=SimpleNamespace(experiment_id="3", run_id="abc", status="RUNNING"))
    link = "http://127.0.0.1:5001/#/experiments/3/runs/abc?workflowType=machine_learning"  # the Model training view
    assert job_runs.run_link("http://127.0.0.1:5001/", run) == link
    assert job_runs.run_link("sqlite:////data/runs/mlflow.db", run).startswith("make ui RUNS=/data/runs, then")


def test_job_table_is_newest_first_and_marks_our_jobs():
    job = lambda ident, start, meta: SimpleNamespace(  # noqa: E731
        submission_id=ident, job_id=None, status="SUCCEEDED", start_time=start, end_time=start + 65_000,
        entrypoint="python -m pipelines run pipelines/configs/demo.yaml " + "--set a=b " * 10, metadata=meta,
    )  # fmt: skip
    table = ray_jobs.job_table([job("old", 1_000_000, {}), job("new", 2_000_000, {"crossmodal.config": "x.yaml"})])
    header, new, old = table.splitlines()
    assert header.split() == ["JOB", "STATUS", "STARTED", "DURATION", "ENTRYPOINT"]
    assert new.startswith("*  new") and old.startswith("   old") and "1m05s" in new
    assert new.endswith("...") and len(new.split("  ")[-1].strip()) == ray_jobs.ENTRYPOINT_WIDTH


def test_no_address_and_an_unreachable_one_are_one_line_errors(capsys):
    assert cli.main(["jobs", "list"]) == 2
    assert capsys.readouterr().err.strip() == (
        "crossmodal: error: no cluster address: pass --address or set RAY_ADDRESS (make cluster-up prints it)"
    )
    address = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["jobs", "status", "some-job", "--address", address]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot reach a Ray dashboard at {address}" in err
    assert cli.main(["submit", str(DEMO_CONFIG), "--address", address]) == 2
    assert f"cannot reach a Ray dashboard at {address}" in capsys.readouterr().err


# -- one local cluster for the rest ------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cluster")
    dashboard, mlflow_port = free_port(), free_port()
    env = os.environ | {
        "CLUSTER_DIR": str(folder),
        "RAY_DASHBOARD_PORT": str(dashboard),
        "MLFLOW_PORT": str(mlflow_port),
        "CROSSMODAL_BIN": str(Path(sys.executable).parent),
    }
    up = subprocess.run([str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield SimpleNamespace(
            env=env,
            folder=folder,
            up=up.stdout,
            address=f"http://127.0.0.1:{dashboard}",
            mlflow=f"http://127.0.0.1:{mlflow_port}",
            groups={int((folder / f"{name}.pgid").read_text()) for name in ("ray", "mlflow")},
        )
    finally:
        subprocess.run([str(SCRIPT), "down"], env=env, capture_output=True, timeout=120)


@pytest.fixture
def tracking(cluster, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cluster.mlflow)  # as `make cluster-up` tells users to
    return MlflowClient(cluster.mlflow)


@pytest.mark.spawn
@pytest.mark.ray
def test_cluster_up_prints_the_exports_both_answer_and_a_second_up_refuses(cluster):
    assert f"export RAY_ADDRESS={cluster.address}\n" in cluster.up
    assert f"export MLFLOW_TRACKING_URI={cluster.mlflow}\n" in cluster.up
    assert b"ray_version" in urllib.request.urlopen(f"{cluster.address}/api/version", timeout=10).read()
    assert urllib.request.urlopen(f"{cluster.mlflow}/health", timeout=10).read().strip() == b"OK"
    again = subprocess.run([str(SCRIPT), "up"], env=cluster.env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.count("\n") == 1 and "already up" in again.stderr


@pytest.mark.spawn
@pytest.mark.ray
def test_submit_wait_runs_the_pipeline_and_prints_its_mlflow_run(cluster, tracking, tmp_path, capsys):
    args = [str(DEMO_CONFIG), "--address", cluster.address, *sets(small_overrides(tmp_path))]
    code = cli.main(["submit", *args, "--set", "mlflow.experiment=jobs-wait", "--only", "ingest,shard", "--wait"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    job_id = re.search(r"submitted job (crossmodal-\S+) to ", out).group(1)
    assert "[shard] ran in" in out and f"job {job_id}: SUCCEEDED" in out
    experiment = tracking.get_experiment_by_name("jobs-wait")
    [parent] = tracking.search_runs([experiment.experiment_id], f"tags.`crossmodal.job_id` = '{job_id}'")
    assert f"MLflow run {parent.info.run_id} " in out
    assert f"{cluster.mlflow}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}" in out
    assert parent.data.tags["crossmodal.kind"] == "pipeline" and parent.info.status == "FINISHED"


@pytest.fixture(scope="module")
def three_jobs(cluster, tmp_path_factory):
    """Three pipeline runs submitted at once (no --wait), each with its own storage root and
    experiment, waited for through the client; -> [(job id, storage root, experiment)]."""
    folder = tmp_path_factory.mktemp("three")
    jobs = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", cluster.mlflow)
        for i in range(3):
            root, experiment = folder / f"storage-{i}", f"jobs-three-{i}"
            overrides = small_overrides(folder / str(i)) + [f"storage.root={root}", f"mlflow.experiment={experiment}"]
            # The last one looks for its run's link (bounded); the first two return at once.
            link = ["--run-timeout", "90"] if i == 2 else ["--no-run-link"]
            argv = ["submit", str(DEMO_CONFIG), "--address", cluster.address, *sets(overrides), "--only", "ingest"]
            output = subprocess.run(
                [sys.executable, "-m", "jobs.cli", *argv, *link],
                cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=180,
            )  # fmt: skip
            assert output.returncode == 0, output.stderr
            jobs.append((re.search(r"submitted job (\S+) ", output.stdout).group(1), root, experiment, output.stdout))
    client = JobSubmissionClient(cluster.address)
    return [(*job, wait_terminal(client, job[0])) for job in jobs]


@pytest.mark.spawn
@pytest.mark.ray
def test_three_jobs_at_once_each_get_their_own_run_and_storage(three_jobs, tracking):
    assert [job[-1] for job in three_jobs] == ["SUCCEEDED"] * 3
    assert "MLflow run " in three_jobs[2][3] and "/#/experiments/" in three_jobs[2][3]
    parents = []
    for job_id, root, experiment, _, _ in three_jobs:
        found = tracking.get_experiment_by_name(experiment)
        runs = tracking.search_runs([found.experiment_id])
        [parent] = [run for run in runs if run.data.tags.get("crossmodal.kind") == "pipeline"]
        assert parent.data.tags["crossmodal.job_id"] == job_id
        assert parent.data.params["storage.root"] == str(root)
        assert (root / "stages" / "ingest").is_dir()
        assert {run.data.tags.get("mlflow.parentRunId") for run in runs if run is not parent} == {parent.info.run_id}
        parents.append(parent.info.run_id)
    assert len(set(parents)) == 3


@pytest.mark.spawn
@pytest.mark.ray
def test_jobs_list_status_and_logs(cluster, three_jobs, tracking, capsys):
    assert cli.main(["jobs", "list", "--address", cluster.address]) == 0
    table = capsys.readouterr().out.splitlines()
    ours = [line for line in table if line.startswith("*  crossmodal-")]
    newest_first = [line.split()[1] for line in ours]
    assert [job[0] for job in reversed(three_jobs)] == [i for i in newest_first if i in {j[0] for j in three_jobs}]
    job_id, _, experiment, _, _ = three_jobs[0]
    assert cli.main(["jobs", "status", job_id, "--address", cluster.address]) == 0
    status = capsys.readouterr().out
    assert status.startswith(f"job {job_id}: SUCCEEDED")
    assert "crossmodal.config: pipelines/configs/demo.yaml" in status
    assert f"crossmodal.experiment: {experiment}" in status
    [parent] = tracking.search_runs(
        [tracking.get_experiment_by_name(experiment).experiment_id], f"tags.`crossmodal.job_id` = '{job_id}'"
    )
    assert f"MLflow run {parent.info.run_id} (FINISHED): {cluster.mlflow}/#/experiments/" in status
    assert cli.main(["jobs", "logs", job_id, "--address", cluster.address]) == 0
    assert "[ingest] ran in" in capsys.readouterr().out


@pytest.mark.spawn
@pytest.mark.ray
def test_stop_a_running_job_and_unknown_ids(cluster, capsys):
    client = JobSubmissionClient(cluster.address)
    job_id = client.submit_job(entrypoint="sleep 60", submission_id=f"sleeper-{free_port()}")
    deadline = time.monotonic() + 60
    while str(client.get_job_status(job_id).value) != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert cli.main(["jobs", "stop", job_id, "--address", cluster.address]) == 0
    assert capsys.readouterr().out == f"job {job_id}: STOPPED\n"
    assert str(client.get_job_status(job_id).value) == "STOPPED"
    for command in ("status", "logs", "stop"):
        assert cli.main(["jobs", command, "no-such-job", "--address", cluster.address]) == 2
        err = capsys.readouterr().err
        assert err == f"crossmodal: error: no job no-such-job on {cluster.address}\n", err


@pytest.mark.spawn
@pytest.mark.ray
def test_cluster_down_leaves_no_process(cluster):
    """Last: a job still running when the cluster goes down (its driver is a session of its own)."""
    client = JobSubmissionClient(cluster.address)
    job_id = client.submit_job(entrypoint="sleep 317")
    deadline = time.monotonic() + 60
    while str(client.get_job_status(job_id).value) != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    down = subprocess.run([str(SCRIPT), "down"], env=cluster.env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert down.stdout.startswith("stopped ray mlflow (process groups")
    assert living(cluster.groups) == []
    assert not [line for line in living_args() if "sleep 317" in line]
    assert not list(cluster.folder.glob("*.pgid"))
    again = subprocess.run([str(SCRIPT), "down"], env=cluster.env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "not up" in again.stdout


def living_args() -> list[str]:
    found = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if not line.lstrip().startswith("Z")]
