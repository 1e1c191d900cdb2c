"""close_abandoned: a driver killed with kill -9 leaves its pipeline run RUNNING and, when it had
started a local Ray cluster, Ray's agents behind (its process group); the next start ends both,
and nothing of the group that is not Ray's."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

from pipelines.config.services import MlflowConfig
from pipelines.lineage import KIND, Lineage, process_start

# A driver that leads its process group, with a Ray agent (as Ray names its processes) and a
# user's process (`crossmodal run | tee`) in that group.
DRIVER = "(exec -a ray::DashboardAgent sleep 300) & (exec -a user-tee sleep 300) & wait"


def group_members(pgid: int) -> dict[str, int]:
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getpgid(int(entry.name)) == pgid:
                found[(entry / "cmdline").read_bytes().split(b"\0")[0].decode()] = int(entry.name)
        except OSError:
            continue
    return found


def dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_for(condition, what: str, timeout: float = 30) -> None:
    event = threading.Event()
    for _ in range(int(timeout / 0.1)):
        if condition():
            return
        event.wait(0.1)  # polling a process table: no event to wait on
    raise AssertionError(f"no {what} within {timeout} s")


def test_the_next_start_marks_the_run_killed_and_ends_only_the_ray_processes_left(tmp_path):
    lineage = Lineage(MlflowConfig(local_store=str(tmp_path / "runs")))
    driver = subprocess.Popen(["bash", "-c", DRIVER], start_new_session=True)
    wait_for(lambda: {"ray::DashboardAgent", "user-tee"} <= set(group_members(driver.pid)), "agent and tee")
    members = group_members(driver.pid)
    run = lineage.client.create_run(
        lineage.experiment_id,
        tags={
            KIND: "pipeline",
            "crossmodal.host": socket.gethostname(),
            "crossmodal.driver_pid": str(driver.pid),
            "crossmodal.driver_start": process_start(driver.pid),
            "crossmodal.driver_pgid": str(driver.pid),
        },
    )
    try:
        assert lineage.close_abandoned() == []  # its driver is alive: not abandoned
        os.kill(driver.pid, signal.SIGKILL)  # the driver alone, as the OOM killer would
        driver.wait()
        assert lineage.close_abandoned() == [(run.info.run_id, 1)]
        wait_for(lambda: dead(members["ray::DashboardAgent"]), "end of the Ray agent")
        assert not dead(members["user-tee"])  # not Ray's: left alone
        assert lineage.client.get_run(run.info.run_id).info.status == "KILLED"
        assert lineage.close_abandoned() == []
    finally:
        for pid in (members["ray::DashboardAgent"], members["user-tee"]):  # not the driver's pid: reused by now
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
