"""The process environment: machine-local values stay on the machine that chose them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
