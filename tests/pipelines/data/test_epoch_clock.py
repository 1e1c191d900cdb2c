"""The train stage's EpochClock lives on the node of the stage that made it: on another node,
that node's loss killed the clock and failed every restart of Ray Train (two-node drill)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import REPO

# Its own two-node cluster (ray.cluster_utils: real raylets), apart from the session's.
SCRIPT = """
import ray
from ray.cluster_utils import Cluster
from pipelines.data.dataset import local_clock

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1, resources={"second": 1})
ray.init(address=cluster.address)

@ray.remote(num_cpus=0, resources={"second": 1})
def stage():
    clock = local_clock(3)
    node = ray.get(clock.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
    return ray.get_runtime_context().get_node_id(), node, ray.get(clock.get.remote())

stage_node, clock_node, epoch = ray.get(stage.remote())
head = ray.get_runtime_context().get_node_id()
print("RESULT", stage_node == clock_node, stage_node != head, epoch, flush=True)
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.spawn
def test_the_clock_is_made_on_the_node_of_its_stage_not_the_head():
    with tempfile.TemporaryDirectory(prefix="clock-") as temp:  # short: Ray's socket paths
        env = os.environ | {"PYTHONPATH": str(REPO), "RAY_TMPDIR": temp, "RAY_AUTH_MODE": "disabled"}
        env.pop("RAY_ADDRESS", None)
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=240)
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert result == ["RESULT True True 3"], done.stdout[-2000:] + done.stderr[-3000:]
