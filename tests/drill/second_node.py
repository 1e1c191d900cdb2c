"""A second Ray node on this machine: a real head and a second raylet (`ray start --address`,
with a resource of its own), the pipeline spread over both, then the second node's raylet
killed by pid while a stage has work on it. Never `ray stop`: it would end every cluster on the
machine; each process this drill started is ended by its pid or its process group."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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


def second_node_killed(scratch: Path) -> list[Row]:
    import ray.util.state as state

    temp = Path(f"/tmp/drill-2n-{os.getpid()}")
    port, dashboard = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    head = start_head(temp, port, dashboard)
    drain_in_background(head)
    second = driver = None
    try:
        second = start_second(temp, port)
        drain_in_background(second)

        def both_alive():
            nodes = state.list_nodes(address=address)
            return nodes if sum(n.state == "ALIVE" for n in nodes) == 2 else None

        nodes = wait_until(both_alive, 120, "two alive nodes")
        extra = next(n.node_id for n in nodes if "drill_node" in (n.resources_total or {}))
        where = [f"storage.root={scratch / 'storage'}", f"mlflow.local_store={scratch / 'runs'}"]
        overrides = [*TINY, *where, "train.max_steps=8", "train.checkpoint_every=2", "train.max_failures=2"]
        driver = Driver(overrides, Path(tempfile.mkdtemp(prefix="drill-drv-")), {"RAY_ADDRESS": address})
        driver.wait_line("[train] running", STAGE_S)  # prepare spread over both nodes by now

        def work_on_extra():  # a train worker, a Ray Data task feeding it, anything on the second node
            on = [("node_id", "=", extra)]
            running = state.list_tasks(address=address, filters=[*on, ("state", "=", "RUNNING")])
            actors = state.list_actors(address=address, filters=[*on, ("state", "=", "ALIVE")])
            return [t.name for t in running] + [a.class_name for a in actors]

        on_extra = wait_until(work_on_extra, STAGE_S, "work running on the second node during training")
        before = Counter(
            "second" if t.node_id == extra else "head" for t in state.list_tasks(address=address, limit=10000)
        )
        raylet = raylet_of(second)
        kill_pids([raylet])
        code = driver.wait(STAGE_S * 2)
        alive = {n.node_id: n.state for n in state.list_nodes(address=address)}
        counts = prepare_counts(scratch / "storage")
        resumed = resumes(scratch / "runs")
    finally:
        left = driver.clean_up() if driver else 0
        if second is not None:
            end_group(second)
        end_group(head)
        stray = pids_with(str(temp))
        kill_pids(stray)
        shutil.rmtree(temp, ignore_errors=True)
    samples_in, usable, quarantined = counts
    holds = samples_in == usable + quarantined and samples_in > 0
    outcome = (
        f"before the kill: {before['head']} tasks on the head, {before['second']} on the second node; its raylet "
        f"killed in train while it ran {sorted(set(on_extra))[:4]}; node now {alive.get(extra)}; exit {code}; "
        f"train's resumed_from_step {resumed} (a restart adds a value); prepare {samples_in} in = {usable} usable + "
        f"{quarantined} quarantined: {'holds' if holds else 'BROKEN'}; {left + len(stray)} stray processes killed"
    )
    return [
        Row(
            "second Ray node killed",
            "head + `ray start --address` raylet (drill_node resource); its raylet SIGKILLed in training",
            "work on both nodes (state API); Ray Data retries, Train restarts on the head; invariant holds; finishes",
            outcome,
            code == 0 and before["second"] > 0 and before["head"] > 0 and holds and alive.get(extra) == "DEAD",
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
