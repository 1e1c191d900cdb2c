"""Processes the service drills start and must stop: the `crossmodal run` driver in its own
process group (with the local Ray cluster it starts under a temp folder of its own), an MLflow
server, and whatever a killed driver leaves behind. No sleeps: every wait is on a condition (a
line on stdout, a process gone, a file), polled with a deadline."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import DEMO_CONFIG, NO_COMPRESSION, REPO, TINY_TRAIN, start_until, stop_group

PYTHON = sys.executable
POLL_S = 0.2  # how often a condition on files or runs is looked at

# The tiny model, a few demo samples, a few steps: every stage, fast (tests.conftest.TINY_TRAIN).
TINY = [
    *NO_COMPRESSION,
    "ingest.demo.num_samples=120",
    "ingest.samples_per_part=100",
    "shard.samples_per_shard=32",
    *TINY_TRAIN,
]


def wait_until(condition: Callable[[], object], timeout: float, what: str):
    """condition()'s first truthy value, looked at every POLL_S; TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        threading.Event().wait(POLL_S)  # a poll interval, not a synchronisation by time
    raise TimeoutError(f"no {what} within {timeout:.0f} s")


def pids_with(text: str) -> list[int]:
    """Live processes whose command line or environment names `text` (a temp folder only this
    drill uses): Ray workers rename themselves (`ray::IDLE`) but keep the raylet's environment."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and not gone(int(entry.name)):
            try:
                if any(text.encode() in (entry / part).read_bytes() for part in ("cmdline", "environ")):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def pids_in_group(pgid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"  # a zombie: dead, waiting for its parent


def kill_pids(pids: list[int], timeout: float = 60) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: all(gone(pid) for pid in pids), timeout, f"end of processes {pids}")


class Driver:
    """`crossmodal run CONFIG --set ...` in a process group of its own; its local Ray cluster
    lives under `ray_tmp` (RAY_TMPDIR), so what it leaves behind can be found by that path."""

    def __init__(self, overrides: list[str], ray_tmp: Path, env: dict[str, str] | None = None):
        self.ray_tmp = ray_tmp
        command = [PYTHON, "-m", "jobs.cli", "run", str(DEMO_CONFIG)]
        for item in overrides:
            command += ["--set", item]
        # Not the user's cluster or tracking server: what the drill sets, nothing else.
        full_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        full_env |= {"PYTHONPATH": str(REPO), "RAY_TMPDIR": str(ray_tmp)} | (env or {})
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.process.stdout:
            with self.changed:  # progress bars use \r: each part is a line of its own here
                self.lines += [part.strip() for part in raw.split("\r") if part.strip()]
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_line(self, text: str, timeout: float) -> str:
        """The first line that contains `text`; TimeoutError (with the tail) if the driver ends first."""
        with self.changed:
            done = self.changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.process.poll() is not None, timeout
            )
            hit = next((line for line in self.lines if text in line), None)
        if hit is None:
            tail = "\n".join(self.lines[-15:])
            state = "timed out" if not done else f"exited {self.process.poll()}"
            raise TimeoutError(f"driver {state} before '{text}':\n{tail}")
        return hit

    def has(self, text: str) -> bool:
        with self.changed:
            return any(text in line for line in self.lines)

    def kill(self) -> float:
        """SIGKILL the driver alone (as the OOM killer or a lost ssh session would); its seconds."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()  # not the reader: what the driver left may hold its stdout open
        return time.monotonic() - self.started

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=30)
        return code

    def leftovers(self) -> list[int]:
        """Processes of its group or its Ray cluster that outlived the driver."""
        return sorted(set(pids_in_group(self.process.pid)) | set(pids_with(str(self.ray_tmp))))

    def clean_up(self) -> int:
        """Kill, by pid, every process it left; how many there were."""
        if self.process.poll() is None:
            self.kill()
        left = self.leftovers()
        kill_pids(left)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return len(left)


def start_mlflow(scratch: Path, port: int):
    """infra/mlflow-server.sh on 127.0.0.1:port over a sqlite store in `scratch` (own process group)."""
    env = os.environ | {
        "MLFLOW_BACKEND_STORE": f"sqlite:///{scratch / 'server' / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS": str(scratch / "server" / "artifacts"),
        "PATH": f"{Path(PYTHON).parent}:{os.environ['PATH']}",
    }
    server = start_until(
        [str(REPO / "infra" / "mlflow-server.sh"), str(port)], "Application startup complete", cwd=scratch, env=env
    )
    # Its log goes on: read it, or a full pipe would stall the server mid-drill.
    threading.Thread(target=drain, args=(server.stdout,), daemon=True).start()
    return server


def drain(stream) -> None:
    try:
        for _ in stream:
            pass
    except (ValueError, OSError):  # closed by stop_group
        pass


def stop_mlflow(server) -> None:
    """The server's whole group (uvicorn and its workers), then wait for the port's owner to end."""
    pids = pids_in_group(server.pid)
    stop_group(server)
    wait_until(lambda: all(gone(pid) for pid in pids), 60, "end of the MLflow server")
