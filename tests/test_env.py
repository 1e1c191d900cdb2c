"""The process environment: machine-local values stay on the machine that chose them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pipelines import env

SCRIPT = """
import json, os
from pipelines import env
handed = env.configure()
print(json.dumps([os.environ["DS_ACCELERATOR"], handed.get("DS_ACCELERATOR")]))
"""


def configured(user: str | None) -> list:
    shell = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    if user is not None:
        shell["DS_ACCELERATOR"] = user
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=shell, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_an_accelerator_chosen_here_is_not_handed_to_workers_and_one_the_user_set_is():
    # This machine has no GPU: the process runs DeepSpeed on the CPU, but a cluster's GPU
    # workers must not be told to (they choose for themselves in worker_setup).
    assert configured(None) == ["cpu", None]
    assert configured("cuda") == ["cuda", "cuda"]


PROGRESS = """
import json
from pipelines import env
print(json.dumps([env.progress_mode(), env.project_env().get("RAY_TQDM")]))
"""


def test_progress_is_lines_in_a_log_and_what_the_driver_said_in_a_worker():
    shell = {k: v for k, v in os.environ.items() if k != env.PROGRESS_ENV and k not in env.PROGRESS_AS_LINES}
    logged = subprocess.run([sys.executable, "-c", PROGRESS], env=shell, capture_output=True, text=True, check=True)
    assert json.loads(logged.stdout) == ["lines", "0"]  # stdout a pipe: Ray Data logs, no bars
    # A Ray worker's stdout is never a terminal: it follows its driver's decision.
    told = dict(shell, **{env.PROGRESS_ENV: "bars"})
    worker = subprocess.run([sys.executable, "-c", PROGRESS], env=told, capture_output=True, text=True, check=True)
    assert json.loads(worker.stdout) == ["bars", None]
