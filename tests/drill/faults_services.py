"""Faults of the services around the stages, on the real CLI, Ray and MLflow (slow: `make drill`
only): the driver killed during each stage in turn, the MLflow server stopped during training
and started again, and a second Ray node killed mid-stage (tests/drill/second_node.py). Each case
stops every process it started, by pid or process group."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

from tests.conftest import free_port
from tests.drill.case import Drill, Row
from tests.drill.processes import TINY, Driver, start_mlflow, stop_mlflow, wait_until
from tests.drill.second_node import second_node_killed

STAGES = ("ingest", "shard", "prepare", "train", "evaluate")
STAGE_S = 900  # the longest a stage of the tiny pipeline may take on a loaded 2-core machine


def ray_temp() -> Path:
    # Short: Ray's unix socket paths under it must stay under 107 characters.
    return Path(tempfile.mkdtemp(prefix="drill-ray-", dir="/tmp"))


def parent_run(driver: Driver) -> str:
    return re.search(r"MLflow run (\w+) in", driver.wait_line("MLflow run", STAGE_S)).group(1)


def running_runs(client: MlflowClient) -> list[str]:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r.info.run_id for r in client.search_runs(experiments, "attributes.status = 'RUNNING'")]


def judge_rerun(stage: str, rerun: Driver, killed_parent: str, client: MlflowClient, left: int, after: int) -> Row:
    """What the re-run after a kill during `stage` did, once it got past that stage; `left`: the
    killed driver's processes alive just after the kill, `after`: those still alive now."""
    before = STAGES[: STAGES.index(stage)]
    reused = [s for s in STAGES if rerun.has(f"[{s}] reused run")]
    redone = [s for s in before if rerun.has(f"[{s}] running")]
    again = "ran" if rerun.has(f"[{stage}] ran in") else "reused" if stage in reused else "neither"
    closed = rerun.has(f"marked run {killed_parent} KILLED")
    ended = re.search(r"ended (\d+) Ray processes", rerun.wait_line(f"marked run {killed_parent}", 1) if closed else "")
    still = [r for r in running_runs(client) if r == killed_parent or r in children(client, killed_parent)]
    states = {r.data.tags.get("crossmodal.stage"): r.info.status for r in client_children(client, killed_parent)}
    passed = closed and not redone and set(before) <= set(reused) and again != "neither" and not still and not after
    outcome = (
        f"re-run: {', '.join(reused) or 'nothing'} reused, {stage} {again}; killed run marked KILLED: "
        f"{'yes' if closed else 'NO'} (its {stage} run {states.get(stage, 'absent')}); runs left RUNNING: "
        f"{len(still)}; {left} processes outlived the driver, the re-run's start ended "
        f"{ended.group(1) if ended else 0}, {after} still alive after it"
    )
    return Row(
        f"driver killed in {stage}",
        f"SIGKILL `crossmodal run` when `[{stage}] running` prints, then the same command again",
        "re-run resumes at the killed stage, finished stages reused, no run left RUNNING, no process left",
        outcome,
        passed,
    )


def client_children(client: MlflowClient, parent: str):
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`mlflow.parentRunId` = '{parent}'")


def children(client: MlflowClient, parent: str) -> set[str]:
    return {r.info.run_id for r in client_children(client, parent)}


def driver_killed_in_each_stage(scratch: Path) -> list[Row]:
    """One chain of runs: kill during ingest; the re-run is killed during shard, and so on; the
    last re-run finishes. Each re-run is the judge of the kill before it."""
    where = [f"storage.root={scratch / 'storage'}", f"mlflow.local_store={scratch / 'runs'}"]
    overrides = [*TINY, *where, "train.max_steps=4", "train.checkpoint_every=2"]
    client = MlflowClient(f"sqlite:///{scratch / 'runs' / 'mlflow.db'}")
    rows, killed, seconds, drivers = [], None, [], []  # killed: (stage, parent run, driver, processes left)
    try:
        for stage in (*STAGES, None):
            # A Ray temp folder each: what a killed driver leaves is found by its own folder.
            driver = Driver(overrides, ray_temp())
            drivers.append(driver)
            parent = parent_run(driver)
            if stage is not None:
                driver.wait_line(f"[{stage}] running", STAGE_S)
                seconds.append(driver.kill())
                left = len(driver.leftovers())
            else:
                code = driver.wait(STAGE_S * 2)
            if killed is not None:  # the stages up to the killed one are behind this run now
                k_stage, k_parent, k_driver, k_left = killed
                rows.append(judge_rerun(k_stage, driver, k_parent, client, k_left, len(k_driver.leftovers())))
                k_driver.clean_up()
            if stage is not None:
                killed = (stage, parent, driver, left)
    finally:
        for driver in drivers:
            driver.clean_up()
    final_running = running_runs(client)
    finished = {s: client.get_run(r).info.status for s, r in stage_runs(client, parent).items()}
    rows.append(
        Row(
            "driver killed: last re-run",
            "the same command after the kill during evaluate",
            "finishes (exit 0), no MLflow run RUNNING in the store",
            f"exit {code}, stages {finished}, runs RUNNING: {len(final_running)}; kills after "
            + ", ".join(f"{s:.0f}" for s in seconds)
            + " s",
            code == 0 and not final_running and set(finished.values()) == {"FINISHED"},
        )
    )
    return rows


def stage_runs(client: MlflowClient, parent: str) -> dict[str, str]:
    return {r.data.tags["crossmodal.stage"]: r.info.run_id for r in client_children(client, parent)}


def checkpoints(root: Path) -> set[str]:
    return {p.name for p in root.glob("ray_train/*/checkpoint_*") if p.is_dir()}


def mlflow_stopped_in_training(scratch: Path) -> list[Row]:
    steps = 16
    port, ray_tmp, storage = free_port(), ray_temp(), scratch / "storage"
    uri = f"http://127.0.0.1:{port}"
    overrides = [*TINY, f"storage.root={storage}", f"mlflow.tracking_uri={uri}"]
    overrides += [f"train.max_steps={steps}", "train.checkpoint_every=2"]
    # Each attempt of the sink fails in seconds, not MLflow's default minutes of retries.
    bounded = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    server = start_mlflow(scratch, port)
    driver = Driver(overrides, ray_tmp, bounded)
    client = MlflowClient(uri)
    try:
        parent = parent_run(driver)
        driver.wait_line("[train] running", STAGE_S)
        train = wait_until(lambda: stage_runs(client, parent).get("train"), 60, "train stage run")
        wait_until(lambda: client.get_metric_history(train, "lr"), STAGE_S, "first train metric")
        stop_mlflow(server)
        server, down_at = None, time.time()
        driver.wait_line("does not answer", 300)
        seen = checkpoints(storage)
        wait_until(lambda: checkpoints(storage) - seen, STAGE_S, "a checkpoint written while MLflow was down")
        server, up_at = start_mlflow(scratch, port), time.time()
        code = driver.wait(STAGE_S * 2)
        points = client.get_metric_history(train, "lr")
        logged = sorted(p.step for p in points)
        while_down = sum(down_at * 1000 <= p.timestamp <= up_at * 1000 for p in points)
        status = client.get_run(train).info.status
        caught_up = driver.has("answers again")
    finally:
        left = driver.clean_up()
        if server is not None:
            stop_mlflow(server)
    outcome = (
        f"exit {code}, train run {status}; server down {up_at - down_at:.0f} s, {while_down} steps logged meanwhile; "
        f"`lr` has {len(logged)} points for steps 1-{steps}"
        f"{' (all)' if logged == list(range(1, steps + 1)) else f' {logged}'}; buffer flushed on return: "
        f"{'yes' if caught_up else 'no'}; {left} processes left, killed"
    )
    return [
        Row(
            "MLflow down in training",
            "stop the tracking server at train's first metric, start it again (same store and port) after a checkpoint",
            "training goes on, the metrics logged meanwhile are written when the server returns, no hang",
            outcome,
            code == 0 and status == "FINISHED" and logged == list(range(1, steps + 1)) and while_down > 0,
        )
    ]


DRILLS = [
    Drill("driver_killed", "fault", driver_killed_in_each_stage, slow=True),
    Drill("mlflow_restarted", "fault", mlflow_stopped_in_training, slow=True),
    Drill("second_node_killed", "fault", second_node_killed, slow=True),
]
