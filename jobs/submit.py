"""Submit a pipeline run to a Ray cluster as a Ray job, and optionally follow it to the end.

    python -m jobs.submit CONFIG --address http://<head>:8265 [--set k=v ...] [--only a,b]
                                 [--from STAGE] [--force] [--wait]

The config is validated here first, so a mistake fails on your laptop, not on the cluster.
The project folder travels as the job's working_dir (without .venv, runs/ and .git); the
cluster's image must have the dependencies installed (see infra/Dockerfile).
Exit codes: 0 submitted (or, with --wait, succeeded), 1 the job failed, 2 a usage mistake.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from pipelines import env

PROJECT = Path(__file__).resolve().parent.parent
EXCLUDES = [".venv/", "runs/", ".git/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/"]
AGENT_WAIT_S = 60.0
# Forwarded to the job when set here, so the job logs to the same MLflow server.
FORWARDED = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def entrypoint(config: str, overrides=(), only: str | None = None, from_stage: str | None = None, force=False) -> str:
    args = ["python", "-m", "pipelines", "run", config]
    for override in overrides:
        args += ["--set", override]
    if only:
        args += ["--only", only]
    if from_stage:
        args += ["--from", from_stage]
    if force:
        args.append("--force")
    return shlex.join(args)


def relative_config(config: str) -> str:
    path = Path(config).resolve()
    if not path.is_relative_to(PROJECT):
        raise ValueError(
            f"{config}: the config must be inside the project folder {PROJECT} (it travels as the job's working_dir)"
        )
    return path.relative_to(PROJECT).as_posix()


def runtime_env() -> dict:
    env_vars = env.project_env() | {k: os.environ[k] for k in FORWARDED if os.environ.get(k)}
    return {"working_dir": str(PROJECT), "excludes": EXCLUDES, "env_vars": env_vars}


def submit(address: str, config: str, overrides=(), only=None, from_stage=None, force=False):
    """Validate the config here, then submit; returns (client, job id)."""
    from ray.job_submission import JobSubmissionClient

    from pipelines.config import load_config

    load_config(config, overrides)
    command = entrypoint(relative_config(config), overrides, only, from_stage, force)
    client = JobSubmissionClient(address)
    # A head that has just started answers before its job agent registers ("No available
    # agent to submit job, please try again later"): retry that, and only that, for a while.
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client, client.submit_job(
                entrypoint=command, runtime_env=runtime_env(), metadata={"crossmodal.config": config}
            )
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


async def _tail(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def follow(client, job_id: str) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    asyncio.run(_tail(client, job_id))
    return str(client.get_job_status(job_id).value)


def main(argv: list[str] | None = None) -> int:
    env.configure()
    parser = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray dashboard address, e.g. http://head:8265 (default: $RAY_ADDRESS)",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--only")
    parser.add_argument("--from", dest="from_stage", metavar="STAGE")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its result")
    args = parser.parse_args(argv)
    if not args.address:
        print("jobs.submit: error: no cluster address: pass --address or set RAY_ADDRESS", file=sys.stderr)
        return 2

    from pipelines.config import ConfigError

    try:
        client, job_id = submit(args.address, args.config, args.overrides, args.only, args.from_stage, args.force)
    except (ConfigError, ValueError, ConnectionError, RuntimeError) as err:
        print(f"jobs.submit: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id} to {args.address}")
    if not args.wait:
        print(f"follow it: ray job logs --address {args.address} --follow {job_id}")
        return 0
    status = follow(client, job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
