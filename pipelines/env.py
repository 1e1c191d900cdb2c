"""Process environment the project needs, set where the project starts (not in the user's shell).

Every entry point (the CLI, the jobs, the test suite) calls `configure()` before it imports
ray, deepspeed, albumentations or mlflow, and the runner hands the same variables to Ray
workers through the runtime environment so remote nodes see them too.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path


def _has_nvidia_gpu() -> bool:
    # Cheap check that does not import torch (1.5 s): the driver exposes device nodes.
    return Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()


# How progress is shown: "bars" (redrawn in place, for a terminal) or "lines" (a log line every
# so often, for a file or a pipe). The driver decides from its own stdout and stderr and hands its
# decision to every Ray worker, whose stdout is never a terminal.
PROGRESS_ENV = "CROSSMODAL_PROGRESS"
PROGRESS_MODES = ("bars", "lines")
PROGRESS_LINE_EVERY_S = 30  # as often as the training loop prints its progress line
# Progress as lines: `make demo > demo.log` got a new copy of Ray Data's bar every second
# (carriage returns, colour codes) and a failed stage's error on the same line as a bar.
PROGRESS_AS_LINES = {
    # Ray Data inside a Ray worker (every stage) draws Ray's tqdm bars on the driver unless
    # this is off; then it logs its progress every RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL s.
    "RAY_TQDM": "0",
    "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": str(PROGRESS_LINE_EVERY_S),
    "RAY_COLOR_PREFIX": "0",  # no colour codes around the "(worker pid=...)" prefix of worker lines
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # MLflow's download and upload bars
    # Plain tqdm bars (DeepSpeed's "Loading checkpoint shards", Hugging Face downloads) only
    # know how to redraw a line: off in a log.
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def progress_mode() -> str:
    """ "bars" when this process writes to a terminal (or was told so by its driver), else "lines"."""
    given = os.environ.get(PROGRESS_ENV, "")
    if given in PROGRESS_MODES:
        return given
    return "bars" if sys.stdout.isatty() and sys.stderr.isatty() else "lines"


def project_env() -> dict[str, str]:
    """The variables and the values the project wants; the user's own settings win."""
    wanted = {
        # albumentations otherwise makes a blocking HTTP request to PyPI on import.
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        # One BLAS thread per process: Ray tasks and train workers already split the cores;
        # more threads oversubscribe them (the probe saw 2.3x slower DeepSpeed steps).
        "OMP_NUM_THREADS": "1",
        # The MLflow server's job runner spawns 7 huey consumers we never use.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # A local Ray cluster is private to this process tree; token auth only adds noise.
        "RAY_AUTH_MODE": "disabled",
        # Ray Train routes a worker's print() to its logger and, as Ray redirects stdout, prints
        # it as well: every progress line of the training loop reached the driver twice.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if not _has_nvidia_gpu():
        wanted["DS_ACCELERATOR"] = "cpu"
    wanted[PROGRESS_ENV] = progress_mode()
    if wanted[PROGRESS_ENV] == "lines":
        wanted |= PROGRESS_AS_LINES
    return {key: os.environ.get(key, value) for key, value in wanted.items()}


# Values that depend on the machine a process runs on: chosen there (pipelines.patches.worker_setup
# for Ray workers), never handed from a driver or a laptop to a cluster, unless the user set them.
MACHINE_LOCAL = ("DS_ACCELERATOR",)
_chosen_here: set[str] = set()


def portable(env: dict[str, str]) -> dict[str, str]:
    """`env` without the machine-local values this process chose for itself: a CPU-only head
    node or laptop must not tell GPU workers to run DeepSpeed on the CPU."""
    return {key: value for key, value in env.items() if key not in MACHINE_LOCAL or key not in _chosen_here}


def worker_defaults() -> None:
    """The machine-local values for a process that was handed none (a Ray worker)."""
    if "DS_ACCELERATOR" not in os.environ and not _has_nvidia_gpu():
        os.environ["DS_ACCELERATOR"] = "cpu"


def configure() -> dict[str, str]:
    """Apply `project_env()` to this process and return what other processes should get (for
    Ray's runtime_env: the machine-local values this process chose are left out)."""
    env = project_env()
    for key, value in env.items():
        if key not in os.environ:
            os.environ[key] = value
            _chosen_here.add(key)
    # torch 2.13 warns on every DeepSpeed collective; hundreds of lines per run.
    warnings.filterwarnings(
        "ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*", category=FutureWarning
    )
    return portable(env)
