"""MLflow lineage: one parent run per pipeline run, one nested run per stage.

Everything goes through `MlflowClient` by run id (no fluent active-run state), so the same
calls work on the driver and inside Ray tasks, against a local sqlite store or a server.
"""

from __future__ import annotations

import os
import posixpath
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

from pipelines.config.services import MlflowConfig
from pipelines.redact import redact, redact_bytes, redact_tree

KIND = "crossmodal.kind"
# MLflow 3.17's UI opens an experiment without this tag in its GenAI view, where runs, metrics
# and charts hide behind a toggle; with it the experiment opens on "Model training".
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Set by `crossmodal submit` in the job's environment: the parent run carries it, so the
# submitter finds the run its job created.
JOB_ID_ENV = "CROSSMODAL_JOB_ID"
PROJECT_DIR = Path(__file__).resolve().parent.parent


def tracking_uri(cfg: MlflowConfig) -> str:
    """Config, then $MLFLOW_TRACKING_URI, then a sqlite store under the local run folder."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = Path(cfg.local_store).expanduser().resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def local_artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside the database; a server chooses its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


# A Ray job's working_dir is a copy without .git: the submitter hands its commit over in this.
GIT_COMMIT_ENV = "CROSSMODAL_GIT_COMMIT"


def git_state() -> tuple[str, bool]:
    """(commit, dirty) of the project's checkout, else what the submitter of this job saw."""
    handed = os.environ.get(GIT_COMMIT_ENV, "")
    if handed and not (PROJECT_DIR / ".git").exists():
        return handed.removesuffix("-dirty"), handed.endswith("-dirty")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown", False
    if commit.returncode != 0:
        return "unknown", False
    return commit.stdout.strip(), bool(dirty.stdout.strip())


def process_start(pid: int) -> str:
    """Kernel start time of a process (to tell a live driver from a reused pid); '' if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def metric_name(name: str) -> str:
    """MLflow allows letters, digits, '_-. :/' in metric and param names:
    'samples.image+text' -> 'samples.image_text'."""
    return re.sub(r"[^\w\-. :/]", "_", name)


def _batched(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def ray_leftovers(pgid: int) -> list[int]:
    """Ray processes still in the process group a dead driver led. When a driver that started a
    local cluster is killed (kill -9, the OOM killer), its raylet and GCS die with it but Ray's
    DashboardAgent and RuntimeEnvAgent do not (Ray 2.60: still there minutes later)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::") or b"site-packages/ray/" in cmdline:  # Ray's, never a user's `| tee`
            found.append(int(entry.name))
    return found


def end_leftovers(pid: int, pgid: int) -> int:
    """SIGKILL what a dead driver's local cluster left, if the driver led its process group (else
    the group is a shell's or a pipeline's, not the driver's to clean); how many there were."""
    if pid != pgid or not pid:
        return 0
    left = ray_leftovers(pgid)
    for leftover in left:
        try:
            os.kill(leftover, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(left)


@dataclass
class StageRecord:
    run_id: str
    output_uri: str


class Lineage:
    def __init__(self, cfg: MlflowConfig):
        self.uri = tracking_uri(cfg)
        self.client = MlflowClient(self.uri)
        self.experiment_id = self._experiment(cfg.experiment)

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            for key, value in EXPERIMENT_KIND.items():
                if found.tags.get(key) != value:
                    self.client.set_experiment_tag(found.experiment_id, key, value)
            return found.experiment_id
        # Explicit location: an experiment first created inside a Ray worker would otherwise
        # put its artifacts in that worker's ephemeral session folder.
        return self.client.create_experiment(
            name, artifact_location=local_artifact_root(self.uri), tags=EXPERIMENT_KIND
        )

    # -- pipeline runs ---------------------------------------------------------------------
    def start_pipeline(
        self, name: str, config_yaml: str, params: dict[str, str], tags: dict[str, str], run_name: str | None = None
    ) -> str:
        commit, dirty = git_state()
        pid = os.getpid()
        job = {"crossmodal.job_id": os.environ[JOB_ID_ENV]} if os.environ.get(JOB_ID_ENV) else {}
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_name or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags=redact_tree(
                {
                    KIND: "pipeline",
                    "crossmodal.pipeline": name,
                    "crossmodal.git_commit": commit,
                    "crossmodal.git_dirty": str(dirty).lower(),
                    MLFLOW_GIT_COMMIT: commit,
                    "crossmodal.host": socket.gethostname(),
                    "crossmodal.driver_pid": str(pid),
                    "crossmodal.driver_start": process_start(pid),
                    "crossmodal.driver_pgid": str(os.getpgid(0)),
                    **job,
                    **tags,
                }
            ),
        )
        run_id = run.info.run_id
        self.log_params(run_id, params)
        self.client.log_text(run_id, redact(config_yaml), "config.yaml")
        return run_id

    def end_pipeline(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)

    def close_abandoned(self) -> list[tuple[str, int]]:
        """Mark runs of drivers on this host that died without ending them (kill -9) KILLED and
        end the Ray processes their local cluster left; (run id, processes ended) of each."""
        host, closed = socket.gethostname(), []
        runs = self.client.search_runs(
            [self.experiment_id], f"tags.`{KIND}` = 'pipeline' and attributes.status = 'RUNNING'"
        )
        for run in runs:
            tags = run.data.tags
            pid = int(tags.get("crossmodal.driver_pid", "0") or 0)
            alive = pid and process_start(pid) == tags.get("crossmodal.driver_start")
            if tags.get("crossmodal.host") == host and not alive:
                for child in self.children(run.info.run_id):
                    if child.info.status == "RUNNING":
                        self.client.set_tag(child.info.run_id, "crossmodal.state", "killed")
                        self.client.set_terminated(child.info.run_id, "KILLED")
                self.client.set_terminated(run.info.run_id, "KILLED")
                ended = end_leftovers(pid, int(tags.get("crossmodal.driver_pgid", "0") or 0))
                closed.append((run.info.run_id, ended))
        return closed

    def close_open_stages(self, parent_id: str, state: str, reason: str) -> None:
        """Stage runs of this pipeline still RUNNING when the driver broke: end them too."""
        for child in self.children(parent_id):
            if child.info.status == "RUNNING":
                self.client.set_tag(child.info.run_id, "crossmodal.state", state)
                self.client.set_tag(child.info.run_id, "crossmodal.error", redact(reason)[:4000])
                self.client.set_terminated(child.info.run_id, "KILLED" if state == "killed" else "FAILED")

    def children(self, parent_id: str):
        return self.client.search_runs(
            [self.experiment_id],
            f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'",
            order_by=["attributes.start_time ASC"],
        )

    # -- stage runs ------------------------------------------------------------------------
    def start_stage(
        self, parent_id: str, stage: str, identity: str, tags: dict[str, str], params: dict[str, str]
    ) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=stage,
            tags=redact_tree(
                {
                    MLFLOW_PARENT_RUN_ID: parent_id,
                    KIND: "stage",
                    "crossmodal.stage": stage,
                    "crossmodal.identity": identity,
                    "crossmodal.state": "running",
                    **tags,
                }
            ),
        )
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def finished_stage(self, identity: str) -> StageRecord | None:
        """The latest stage run with this identity that finished, if any."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.`crossmodal.identity` = '{identity}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs or not runs[0].data.tags.get("crossmodal.output_uri"):
            return None
        return StageRecord(runs[0].info.run_id, runs[0].data.tags["crossmodal.output_uri"])

    def latest_finished(self, stage: str):
        """The latest finished run of a stage, whatever its identity (to say what differs now)."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.`crossmodal.stage` = '{stage}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def finish_stage(
        self,
        run_id: str,
        state: str,
        output_uri: str,
        metrics: dict[str, float],
        tables: dict[str, list[dict]],
        result: dict,
        seconds: float,
        artifacts: dict[str, str] | None = None,
    ) -> None:
        self.client.set_tag(run_id, "crossmodal.output_uri", redact(output_uri))
        self.client.set_tag(run_id, "crossmodal.state", state)
        self.log_metrics(run_id, {**metrics, "stage_seconds": seconds})
        for name, rows in tables.items():
            if rows:
                columns = {k: [row.get(k) for row in rows] for k in rows[0]}
                self.client.log_table(run_id, redact_tree(columns), f"tables/{name}.json")
        for artifact_path, uri in (artifacts or {}).items():
            self.log_storage_file(run_id, uri, artifact_path)
        self.client.log_dict(run_id, redact_tree(result), "stage_result.json")
        self.client.set_terminated(run_id, "FINISHED")

    def log_storage_file(self, run_id: str, uri: str, artifact_path: str) -> None:
        """Copy a file from the storage root (any filesystem) into the run's artifacts."""
        import tempfile

        from pipelines.storage import Storage

        folder, name = posixpath.split(artifact_path)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / name
            local.write_bytes(redact_bytes(Storage(uri).read_bytes()))
            self.client.log_artifact(run_id, str(local), folder or None)

    def fail_stage(self, run_id: str, one_line: str, details: str) -> None:
        self.client.set_tag(run_id, "crossmodal.state", "failed")
        self.client.set_tag(run_id, "crossmodal.error", redact(one_line)[:4000])
        self.client.log_text(run_id, redact(details), "error.txt")
        self.client.set_terminated(run_id, "FAILED")

    # -- small helpers ---------------------------------------------------------------------
    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(metric_name(redact(k)), redact(str(v))[:6000]) for k, v in sorted(params.items())]
        for chunk in _batched(items, 100):
            self.client.log_batch(run_id, params=chunk)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(metric_name(k), float(v), now, step) for k, v in sorted(metrics.items())]
        for chunk in _batched(items, 1000):
            self.client.log_batch(run_id, metrics=chunk)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(redact(k), redact(str(v))) for k, v in tags.items()])
