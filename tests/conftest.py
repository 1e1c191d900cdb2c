"""Shared fixtures: one real local Ray cluster per session, a fresh MLflow store per test."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from pipelines import env

REPO = Path(__file__).resolve().parent.parent
# Real files written by other projects; this workplace keeps them beside the repository.
FIXTURES = Path(os.environ.get("CROSSMODAL_FIXTURES", REPO.parent / "shared" / "fixtures"))
DEMO_CONFIG = REPO / "pipelines" / "configs" / "demo.yaml"


def pytest_collection_modifyitems(items):
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _own_mlflow_and_ray(monkeypatch):
    # A user's shell must not point the tests at their real tracking server or cluster.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def start_local_ray():
    """The tests' (and the drill's) local Ray cluster: 4 logical CPUs, a small object store."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            object_store_memory=512 * 1024 * 1024,
            include_dashboard=False,
            runtime_env={"env_vars": env.project_env(), "worker_process_setup_hook": "pipelines.patches.worker_setup"},
            logging_level=logging.WARNING,
        )
    return ray


@pytest.fixture(scope="session")
def ray_cluster():
    ray = start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"shared fixtures not found at {FIXTURES}")
    return FIXTURES


# The demo config compresses after evaluate; tests of the other stages switch that off.
NO_COMPRESSION = ["distill.enabled=false", "prune.enabled=false", "quantize.enabled=false", "registry.enabled=false"]


# Small and quick: the tiny model, a few steps, one train worker, 32-pixel images. Callers
# append their own overrides after it (the last value of a key wins).
TINY_TRAIN = [
    "train.model.size=tiny",
    "train.model.image_encoder=vit",
    "train.model.overrides={}",
    "train.workers=1",
    "train.precision=fp32",  # bf16 is slow on CPUs without native bf16 (see test_train_stage.py)
    "train.micro_batch=8",
    "train.max_steps=4",
    "train.max_minutes=null",
    "train.val_every=2",
    "train.checkpoint_every=4",
    "train.log_every=1",
    "train.stream_epochs=1",
    "prepare.image_size=32",
    "prepare.batch_size=32",
    "prepare.preview_samples=2",
    "evaluate.max_caption_tokens=8",
]


def small_overrides(tmp_path: Path) -> list[str]:
    """A few hundred demo samples, all state under tmp_path, no compression stages."""
    return [
        *NO_COMPRESSION,
        f"storage.root={tmp_path / 'storage'}",
        f"mlflow.local_store={tmp_path / 'runs'}",
        "ingest.demo.num_samples=240",
        "ingest.samples_per_part=100",
        "shard.samples_per_shard=32",
    ]


@pytest.fixture
def demo_config(tmp_path):
    from pipelines.config import load_config

    return load_config(DEMO_CONFIG, small_overrides(tmp_path))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_until(command: list[str], ready: str, **popen):
    """Start a server in its own process group; return once it prints `ready` (no sleeps)."""
    import subprocess

    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if ready in line:
            return process
    raise AssertionError(f"{command[0]} exited before '{ready}':\n" + "".join(seen[-40:]))


def stop_group(process) -> None:
    import os
    import signal

    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
    process.stdout.close()
