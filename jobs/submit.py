"""Submit a pipeline run to a Ray cluster as a Ray job, and optionally follow it to the end.

    python -m jobs.submit CONFIG --address http://<head>:8265 [--set k=v ...] [--only a,b]
                                 [--from STAGE] [--force] [--wait]

The same as `crossmodal submit` (jobs/ray_jobs.py), which this module's main() runs. The config
is validated here first, so a mistake fails on your laptop, not on the cluster. The project
folder travels as the job's working_dir (without .venv, runs/ and .git); the cluster's image
must have the dependencies installed (see infra/Dockerfile).
Exit codes: 0 submitted (or, with --wait, succeeded), 1 the job failed, 2 a usage mistake.
"""

from __future__ import annotations

import argparse
import getpass
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipelines import env

PROJECT = Path(__file__).resolve().parent.parent
EXCLUDES = [".venv/", "runs/", ".git/", "**/__pycache__/", "*.egg-info/", ".pytest_cache/"]
AGENT_WAIT_S = 60.0
# Forwarded to the job when set here, so the job logs to the same MLflow server.
FORWARDED = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# Job metadata keys; `crossmodal jobs list` marks the jobs that carry CONFIG_KEY.
CONFIG_KEY = "crossmodal.config"


def entrypoint(
    config: str, overrides=(), only: str | None = None, from_stage: str | None = None, force=False, nightly=False
) -> str:
    """The job's command: one pipeline run, or with `nightly` the nightly retrain (jobs/nightly.py)."""
    if nightly and (only or from_stage or force):
        raise ValueError("--nightly runs the whole pipeline: --only, --from and --force do not apply")
    args = ["python", "-m", "jobs.nightly" if nightly else "pipelines", *([] if nightly else ["run"]), config]
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


def new_job_id() -> str:
    """Chosen here, not by Ray, so the job's environment can carry it to its MLflow run."""
    return f"crossmodal-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def runtime_env(job_id: str | None = None) -> dict:
    from pipelines.lineage import GIT_COMMIT_ENV, JOB_ID_ENV, git_state  # imports mlflow: only when submitting

    env_vars = env.portable(env.project_env()) | {k: os.environ[k] for k in FORWARDED if os.environ.get(k)}
    # A job's driver writes to Ray's job log, whatever terminal it was submitted from: progress as lines.
    env_vars |= {env.PROGRESS_ENV: "lines", **env.PROGRESS_AS_LINES}
    if job_id:
        env_vars[JOB_ID_ENV] = job_id
    commit, dirty = git_state()
    if commit != "unknown":
        env_vars[GIT_COMMIT_ENV] = commit + ("-dirty" if dirty else "")
    return {"working_dir": str(PROJECT), "excludes": EXCLUDES, "env_vars": env_vars}


def job_metadata(config: str, experiment: str, tracking: str | None) -> dict[str, str]:
    """What `crossmodal jobs` shows and uses later: whose run of which config, where it logs."""
    from pipelines.lineage import git_state

    commit, dirty = git_state()
    meta = {
        CONFIG_KEY: config,
        "crossmodal.user": getpass.getuser(),
        "crossmodal.git_commit": commit + ("-dirty" if dirty else ""),
        "crossmodal.experiment": experiment,
    }
    if tracking:
        meta["crossmodal.tracking_uri"] = tracking
    return meta


@dataclass
class Submission:
    client: object  # ray.job_submission.JobSubmissionClient
    job_id: str
    cfg: object  # pipelines.config.PipelineConfig, as loaded here with the overrides


def submit(
    address: str, config: str, overrides=(), only=None, from_stage=None, force=False, connect=None, nightly=False
):
    """Validate the config here, then connect (`connect(address)` -> client) and submit under an
    id of ours; returns a Submission. The config is checked first: a mistake needs no cluster."""
    from jobs.job_runs import job_tracking_uri
    from pipelines.config import load_config

    cfg = load_config(config, overrides)
    pinned = absolute_paths(cfg, address)
    if pinned:
        overrides = [*overrides, *pinned]
        cfg = load_config(config, overrides)
    if nightly and not cfg.registry.enabled:
        raise ValueError(f"{config}: the nightly promotes registered models: set registry.enabled: true")
    relative = relative_config(config)
    command = entrypoint(relative, overrides, only, from_stage, force, nightly)
    if connect is None:
        from ray.job_submission import JobSubmissionClient as connect
    client = connect(address)
    job_id = new_job_id()
    metadata = job_metadata(relative, cfg.mlflow.experiment, job_tracking_uri(cfg.mlflow)[0])
    # A head that has just started answers before its job agent registers ("No available
    # agent to submit job, please try again later"): retry that, and only that, for a while.
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(
                entrypoint=command, submission_id=job_id, runtime_env=runtime_env(job_id), metadata=metadata
            )
            return Submission(client, job_id, cfg)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def absolute_paths(cfg, address: str) -> list[str]:
    """A job runs in a temporary copy of the project, so a relative storage root (or local
    MLflow store) would put its results there. On a cluster on this machine they become the
    absolute paths they name here (overrides to add); on any other cluster that is an error."""
    from urllib.parse import urlparse

    relative = {"storage.root": cfg.storage.root}
    if not cfg.mlflow.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI"):
        relative["mlflow.local_store"] = cfg.mlflow.local_store
    relative = {key: value for key, value in relative.items() if "://" not in value and not Path(value).is_absolute()}
    if not relative:
        return []
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        key, value = next(iter(relative.items()))
        raise ValueError(
            f"{key} {value} is relative: on the cluster it would land in the job's temporary working_dir; "
            "use storage every node sees (s3://..., a shared mount) and an MLflow server (MLFLOW_TRACKING_URI)"
        )
    return [f"{key}={Path(value).resolve()}" for key, value in relative.items()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The submit command's arguments, shared by `crossmodal submit` and `python -m jobs.submit`."""
    parser.add_argument("config", help="YAML config inside the project folder, e.g. pipelines/configs/demo.yaml")
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray dashboard address, e.g. http://head:8265 (default: $RAY_ADDRESS)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable); validated here before submitting",
    )
    parser.add_argument("--only", help="comma-separated stages to run")
    parser.add_argument("--from", dest="from_stage", metavar="STAGE", help="re-run STAGE and every stage after it")
    parser.add_argument("--force", action="store_true", help="re-run the selected stages even if they finished")
    parser.add_argument("--wait", action="store_true", help="stream the job's logs and exit with its result")
    parser.add_argument(
        "--nightly", action="store_true", help="run the nightly retrain (crossmodal nightly) as the job instead"
    )
    parser.add_argument(
        "--run-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="without --wait: how long to wait for the job's MLflow run to print its link (default: 60)",
    )
    parser.add_argument(
        "--no-run-link", action="store_true", help="do not look for the job's MLflow run (return at once)"
    )


def main(argv: list[str] | None = None) -> int:
    from jobs import ray_jobs
    from pipelines.errors import UserError

    env.configure()
    parser = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return ray_jobs.command_submit(args)
    except UserError as err:
        print(f"jobs.submit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
