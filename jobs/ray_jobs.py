"""`crossmodal submit` and `crossmodal jobs list|status|logs|stop`: pipeline runs as Ray jobs on a
cluster's dashboard address (`make cluster-up` starts one on this machine), each one linked to
the MLflow parent run it creates.

Every user mistake (no address, an address that does not answer, an unknown job id, a config
error) is one line on stderr and exit 2; `submit --wait` exits 1 when the job does not succeed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from datetime import datetime
from urllib.parse import urlsplit

from jobs import job_runs
from jobs import submit as submitting
from pipelines.errors import UserError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
ENTRYPOINT_WIDTH = 60
CONNECT_TIMEOUT_S = 5.0


class JobsError(UserError):
    """A job or cluster the user named that is not there; one line, exit 2."""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# -- the cluster ---------------------------------------------------------------------------------
def _check_reachable(address: str) -> None:
    # Ray's client sends its first request without a timeout: an address that drops packets
    # would hang the command for minutes instead of failing in seconds.
    parts = urlsplit(address if "://" in address else f"http://{address}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as err:
        raise JobsError(f"cannot reach a Ray dashboard at {address}: {_first_line(err)}") from None


def connect(address: str | None):
    """A JobSubmissionClient for the dashboard at `address`, or one line saying why not."""
    if not address:
        raise JobsError("no cluster address: pass --address or set RAY_ADDRESS (make cluster-up prints it)")
    _check_reachable(address)
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError, OSError) as err:
        raise JobsError(f"cannot reach a Ray dashboard at {address}: {_first_line(err)}") from None


def _call(address: str, job_id: str | None, method, *args):
    """One request to the dashboard, its failures said in one line naming the job or address."""
    try:
        return method(*args)
    except RuntimeError as err:
        if job_id and "status code 404" in str(err):
            raise JobsError(f"no job {job_id} on {address}") from None
        raise JobsError(f"{address}: {_first_line(err)}") from None
    except OSError as err:  # ConnectionError and requests' errors
        raise JobsError(f"lost the Ray dashboard at {address}: {_first_line(err)}") from None


def _status(client, address: str, job_id: str) -> str:
    return str(_call(address, job_id, client.get_job_status, job_id).value)


async def _tail(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def follow(client, address: str, job_id: str) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    import aiohttp

    try:
        asyncio.run(_tail(client, job_id))
    except (aiohttp.ClientError, RuntimeError) as err:
        raise JobsError(f"lost the log stream of job {job_id} on {address}: {_first_line(err)}") from None
    return _status(client, address, job_id)


def _address_hint(address: str) -> str:
    return "" if address == os.environ.get("RAY_ADDRESS") else f" --address {address}"


# -- submit --------------------------------------------------------------------------------------
def command_submit(args) -> int:
    try:
        sub = submitting.submit(
            args.address,
            args.config,
            args.overrides,
            args.only,
            args.from_stage,
            args.force,
            connect=connect,
            nightly=args.nightly,
        )
    except (ValueError, RuntimeError, OSError) as err:  # ConfigError is a ValueError
        if isinstance(err, JobsError):
            raise
        raise JobsError(_first_line(err)) from None
    job_id, hint = sub.job_id, _address_hint(args.address)
    print(f"submitted job {job_id} to {args.address}", flush=True)
    uri, why_not = job_runs.job_tracking_uri(sub.cfg.mlflow)
    if uri is None and not args.no_run_link:
        print(f"MLflow run: not looked up: {why_not}", flush=True)
    look = uri is not None and not args.no_run_link
    if args.wait:
        return _wait(sub, args.address, uri if look else None)
    if look:
        done = lambda: _status(sub.client, args.address, job_id) in TERMINAL  # noqa: E731
        run = job_runs.wait_for_run(uri, sub.cfg.mlflow.experiment, job_id, args.run_timeout, done)
        if run is not None:
            print(job_runs.describe(uri, run))
        else:
            print(f"MLflow run: none yet in {uri}; later: crossmodal jobs status {job_id}{hint}")
    print(f"follow it: crossmodal jobs logs --follow {job_id}{hint}   (stop it: crossmodal jobs stop {job_id}{hint})")
    return 0


def _wait(sub, address: str, uri: str | None) -> int:
    """Stream the logs, print the run's link when it appears, exit with the job's result."""
    echo = lambda line: print(line, flush=True)  # noqa: E731
    watcher = job_runs.RunWatcher(uri, sub.cfg.mlflow.experiment, sub.job_id, echo) if uri else None
    if watcher:
        watcher.start()
    try:
        status = follow(sub.client, address, sub.job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {sub.job_id} keeps running", file=sys.stderr)
        return 130
    finally:
        run = watcher.finish() if watcher else None
    print(f"job {sub.job_id}: {status}")
    if watcher and run is None:
        print(f"MLflow run: none found in {uri}")
    return 0 if status == "SUCCEEDED" else 1


# -- jobs list | status | logs | stop ------------------------------------------------------------
def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def _duration(job) -> str:
    if not job.start_time:
        return "-"
    end = job.end_time or time.time() * 1000
    seconds = int(max(0, end - job.start_time) / 1000)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _shorten(text: str, width: int = ENTRYPOINT_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _is_ours(job) -> bool:
    return submitting.CONFIG_KEY in (job.metadata or {})


def job_table(jobs) -> str:
    """Newest first; '*' marks this project's pipeline jobs."""
    jobs = sorted(jobs, key=lambda job: job.start_time or 0, reverse=True)
    rows = [("", "JOB", "STATUS", "STARTED", "DURATION", "ENTRYPOINT")]
    for job in jobs:
        ident = job.submission_id or job.job_id or "-"
        status = str(getattr(job.status, "value", job.status))
        rows.append(("*" if _is_ours(job) else "", ident, status, _when(job.start_time), _duration(job)))
        rows[-1] += (_shorten(job.entrypoint or ""),)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def command_list(args) -> int:
    client = connect(args.address)
    jobs = _call(args.address, None, client.list_jobs)
    if not jobs:
        print(f"no jobs on {args.address}")
        return 0
    print(job_table(jobs))
    print("* a crossmodal pipeline job (crossmodal jobs status ID: its config and MLflow run)")
    return 0


def _run_line(job) -> str | None:
    """The MLflow line of `jobs status` for one of our jobs; None for other jobs."""
    meta = job.metadata or {}
    if not _is_ours(job):
        return None
    uri, experiment = meta.get("crossmodal.tracking_uri"), meta.get("crossmodal.experiment")
    if not uri or not experiment:
        return "MLflow run: unknown (the job logs to a store in its working directory on the cluster)"
    run = job_runs.find_parent_run(uri, experiment, job.submission_id or "")
    return job_runs.describe(uri, run) if run else f"MLflow run: none found in {uri}"


def command_status(args) -> int:
    client = connect(args.address)
    job = _call(args.address, args.job_id, client.get_job_info, args.job_id)
    status = str(getattr(job.status, "value", job.status))
    print(f"job {args.job_id}: {status}" + (f" ({job.message})" if job.message else ""))
    print(f"entrypoint: {job.entrypoint}")
    print(f"started {_when(job.start_time)}, ended {_when(job.end_time)}, took {_duration(job)}")
    for key, value in sorted((job.metadata or {}).items()):
        print(f"  {key}: {value}")
    line = _run_line(job)
    if line:
        print(line)
    return 0


def command_logs(args) -> int:
    client = connect(args.address)
    _call(args.address, args.job_id, client.get_job_info, args.job_id)  # an unknown id: one line
    if args.follow:
        try:
            status = follow(client, args.address, args.job_id)
        except KeyboardInterrupt:
            return 130
        print(f"job {args.job_id}: {status}")
        return 0
    print(_call(args.address, args.job_id, client.get_job_logs, args.job_id), end="")
    return 0


def command_stop(args) -> int:
    client = connect(args.address)
    status = _status(client, args.address, args.job_id)
    if status in TERMINAL:
        print(f"job {args.job_id}: already {status}")
        return 0
    _call(args.address, args.job_id, client.stop_job, args.job_id)
    # Ray stops a job asynchronously (SIGTERM, then SIGKILL after its grace period).
    deadline = time.monotonic() + args.timeout
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        status = _status(client, args.address, args.job_id)
    print(f"job {args.job_id}: {status}")
    return 0 if status in TERMINAL else 1


JOB_COMMANDS = {"list": command_list, "status": command_status, "logs": command_logs, "stop": command_stop}


def command_jobs(args) -> int:
    return JOB_COMMANDS[args.jobs_command](args)


# -- the command line ----------------------------------------------------------------------------
def _address_argument(parser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray dashboard address, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)",
    )


def add_commands(sub) -> None:
    submit = sub.add_parser("submit", help="run a pipeline as a Ray job on a cluster and print its id and MLflow run")
    submitting.add_arguments(submit)
    jobs = sub.add_parser("jobs", help="list, inspect, follow and stop the Ray jobs on a cluster")
    actions = jobs.add_subparsers(dest="jobs_command", required=True)
    listing = actions.add_parser("list", help="every job, newest first; '*' marks crossmodal pipeline jobs")
    _address_argument(listing)
    status = actions.add_parser("status", help="a job's state, message, metadata and MLflow run")
    logs = actions.add_parser("logs", help="a job's logs so far (--follow: until it ends)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep streaming until the job ends")
    stop = actions.add_parser("stop", help="stop a job and print its final state")
    stop.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="wait this long for it to end (default: 60)"
    )
    for parser in (status, logs, stop):
        parser.add_argument("job_id", metavar="ID", help="the job's submission id (crossmodal jobs list)")
        _address_argument(parser)


COMMANDS = {"submit": command_submit, "jobs": command_jobs}
