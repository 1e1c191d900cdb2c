"""Extra Ray nodes on this machine: a real head and two more raylets (`ray start --address`,
with a resource of their own), the pipeline spread over them, then one node's raylet killed by
pid while prepare has work on it, the other while a train worker runs there (train places its
workers with SPREAD) and a checkpoint is registered. Never `ray stop`: it would end every
cluster on the machine; each process this drill started is ended by its pid or process group."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from tests.conftest import REPO, free_port, start_until, stop_group
from tests.drill.case import Row
from tests.drill.processes import PYTHON, TINY, Driver, gone, kill_pids, pids_in_group, pids_with, wait_until

RAY = str(Path(PYTHON).parent / "ray")
STAGE_S = 900


def node_env(temp: Path) -> dict[str, str]:
    # Workers the raylets start import this checkout (the driver passes no working_dir). The
    # mark: every process of both nodes inherits it, workers included (they rename themselves
    # and live in process groups of their own), so the end of the drill finds them all.
    ours = {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    return os.environ | ours | {"CROSSMODAL_DRILL_NODE": str(temp)}


def start_head(temp: Path, port: int, dashboard: int):
    # The state API is served by the dashboard: on, on 127.0.0.1 and a free port. Four logical
    # CPUs, as the pipeline's own local cluster: Ray Data hangs when train takes every CPU.
    command = [RAY, "start", "--head", f"--port={port}", "--num-cpus=4", "--include-dashboard=true"]
    command += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}"]
    command += [f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
    command += ["--object-store-memory=400000000", "--block"]
    return start_until(command, "Ray runtime started", env=node_env(temp))


def start_second(temp: Path, port: int):
    command = [RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", '--resources={"drill_node": 1}']
    command += [f"--dashboard-agent-listen-port={free_port()}", "--object-store-memory=300000000", "--block"]
    return start_until(command, "Ray runtime started", env=node_env(temp))


def drain_in_background(process) -> None:
    import threading

    from tests.drill.processes import drain

    threading.Thread(target=drain, args=(process.stdout,), daemon=True).start()


def raylet_of(node) -> int:
    return next(p for p in pids_in_group(node.pid) if b"raylet/raylet" in Path(f"/proc/{p}/cmdline").read_bytes())


def end_group(node) -> None:
    pids = pids_in_group(node.pid)
    stop_group(node)
    wait_until(lambda: all(gone(p) for p in pids), 60, "end of a Ray node's processes")


def join_node(temp: Path, port: int, address: str, state, known: tuple[str, ...] = ()) -> tuple:
    """One more node joined and alive: (its `ray start` process, its node id)."""
    node = start_second(temp, port)
    drain_in_background(node)

    def joined():
        alive = [n for n in state.list_nodes(address=address) if n.state == "ALIVE" and n.node_id not in known]
        return next((n.node_id for n in alive if "drill_node" in (n.resources_total or {})), None)

    return node, wait_until(joined, 120, "the second node alive")


def kill_when_busy(node, node_id: str, address: str, state, driver: Driver, stage: str, ready=None) -> list[str]:
    """SIGKILL the node's raylet (by pid) once it has had work in `stage` and `ready()` holds
    (or that stage ended: then it is killed idle, and the list says so); what ran there."""
    since = time.time() * 1000

    def work_on_node():  # a Ray Data task, a train worker: any task or actor of this stage there
        on = [("node_id", "=", node_id)]
        tasks = [
            t for t in state.list_tasks(address=address, filters=on, detail=True) if (t.creation_time_ms or 0) >= since
        ]
        actors = state.list_actors(address=address, filters=[*on, ("state", "=", "ALIVE")])
        busy = [t.name for t in tasks] + [a.class_name for a in actors]
        if busy and (ready is None or ready()):
            return busy
        return driver.has(f"[{stage}] ran in")

    busy = wait_until(work_on_node, STAGE_S, f"work on the extra node in {stage}")
    kill_pids([raylet_of(node)])
    return sorted(set(busy)) if isinstance(busy, list) else []


def checkpoint_registered(storage: Path) -> bool:
    """Ray Train has registered a checkpoint of the train stage (a restart resumes from it)."""
    for snapshot in storage.glob("ray_train/train-*/checkpoint_manager_snapshot.json"):
        try:
            if json.loads(snapshot.read_text()).get("checkpoint_results"):
                return True
        except (OSError, ValueError):  # being written
            continue
    return False


def train_workers_by_node(address: str, state, names: dict[str, str]) -> Counter:
    """Ray Train worker actors (alive or dead) per node: the first group and the restarted one."""
    actors = state.list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], limit=1000)
    return Counter(names.get(a.node_id, "head") for a in actors)


def second_node_killed(scratch: Path) -> list[Row]:
    """Two kills: a second node in prepare's Ray Data pass, then a fresh one in training."""
    import ray.util.state as state

    temp = Path(f"/tmp/drill-2n-{os.getpid()}")
    port, dashboard = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    head = start_head(temp, port, dashboard)
    drain_in_background(head)
    nodes, driver = [], None
    try:
        # Both extra nodes join before the driver starts: Ray Train places its workers when
        # train starts, and a node that joins later would get none of them.
        first, in_prepare = join_node(temp, port, address, state)
        second, in_train = join_node(temp, port, address, state, known=(in_prepare,))
        nodes += [first, second]
        where = [f"storage.root={scratch / 'storage'}", f"mlflow.local_store={scratch / 'runs'}"]
        # SPREAD: one of the two train workers is placed on the extra node, so its loss is a
        # lost worker group that Ray Train must restart on the head alone.
        train = ["train.workers=2", "train.max_steps=30", "train.checkpoint_every=2", "train.max_failures=2"]
        train += ["train.placement=SPREAD"]
        overrides = [*TINY, *where, *train]
        driver = Driver(overrides, Path(tempfile.mkdtemp(prefix="drill-drv-")), {"RAY_ADDRESS": address})
        driver.wait_line("[prepare] running", STAGE_S)
        busy_prepare = kill_when_busy(first, in_prepare, address, state, driver, "prepare")
        driver.wait_line("[train] running", STAGE_S)
        storage = scratch / "storage"

        def registered():  # the kill waits for a checkpoint the restart can resume from
            return checkpoint_registered(storage)

        busy_train = kill_when_busy(second, in_train, address, state, driver, "train", registered)
        code = driver.wait(STAGE_S * 2)
        tasks = state.list_tasks(address=address, limit=10000)
        per_node = Counter({in_prepare: "first", in_train: "second"}.get(t.node_id, "head") for t in tasks)
        alive = {n.node_id: n.state for n in state.list_nodes(address=address)}
        workers = train_workers_by_node(address, state, {in_prepare: "first", in_train: "second"})
        counts = prepare_counts(scratch / "storage")
        resumed = resumes(scratch / "runs")
    finally:
        left = driver.clean_up() if driver else 0
        for node in [*nodes, head]:
            end_group(node)
        stray = pids_with(str(temp))
        kill_pids(stray)
        shutil.rmtree(temp, ignore_errors=True)
    samples_in, usable, quarantined = counts
    holds = samples_in == usable + quarantined and samples_in > 0
    dead = [alive.get(in_prepare), alive.get(in_train)]
    outcome = (
        f"tasks (by the node of their last attempt): head {per_node['head']}, first extra node {per_node['first']}, "
        f"second {per_node['second']}; first killed in prepare after it ran {busy_prepare[:3] or 'nothing'}, second "
        f"in train after it ran {busy_train[:3] or 'nothing (train ended first)'}; "
        f"nodes now {dead}; exit {code}; train workers: {workers['second']} on the second extra node, "
        f"{workers['head']} on the head (first group and restart); "
        f"train's resumed_from_step {resumed} (a Train restart adds a value); "
        f"prepare {samples_in} in = {usable} usable + {quarantined} quarantined: {'holds' if holds else 'BROKEN'}; "
        f"{left + len(stray)} stray processes killed"
    )
    return [
        Row(
            "extra Ray node killed",
            "head + a `ray start --address` raylet (drill_node resource), SIGKILLed in prepare; another, in train",
            "work on every node (state API); Ray Data retries; Train restarts on the head from its latest "
            "checkpoint; invariant holds; finishes",
            outcome,
            # Work on the first extra node is what the state API showed before its kill (a retried
            # task is listed under the node of its last attempt).
            code == 0
            and bool(busy_prepare)
            and "RayTrainWorker" in busy_train
            and workers["head"] > workers["second"]  # the restarted group lives on the head alone
            and len(resumed) >= 2
            and max(resumed) > 0  # the restart resumed a checkpoint, not step 0
            and per_node["head"] > 0
            and holds
            and dead == ["DEAD"] * 2,
            samples_in,
            usable,
            quarantined,
        )
    ]


def resumes(runs: Path) -> list[float]:
    """The train run's `resumed_from_step` values: one per training session (0 = from scratch)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    train = client.search_runs(experiments, "tags.`crossmodal.stage` = 'train'")
    return [m.value for m in client.get_metric_history(train[0].info.run_id, "resumed_from_step")] if train else []


def prepare_counts(storage: Path) -> tuple[int, int, int]:
    """(samples in, usable, quarantined) from the finished prepare stage's marker."""
    markers = list(storage.glob("stages/prepare/*/_SUCCESS.json"))
    if not markers:
        return 0, 0, 0
    metrics = json.loads(markers[-1].read_text())["result"]["metrics"]
    return int(metrics["samples_in"]), int(metrics["samples_usable"]), int(metrics["quarantined"])
