"""Run a pipeline: order the stages, reuse what already finished, run the rest as Ray work.

One MLflow parent run per pipeline run and one nested run per stage (ran, reused or failed).
A stage's output folder is `<storage root>/stages/<name>/<identity>`; it counts as finished
only when both its MLflow run FINISHED and its `_SUCCESS.json` marker is in place, so a
pipeline killed in the middle of a stage redoes that stage and nothing before it.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import ray
import yaml

from pipelines import env
from pipelines.config import PipelineConfig, RayConfig, flatten
from pipelines.config.pipeline import AGREEMENTS
from pipelines.dag import (
    PlanError,
    Stage,
    StageContext,
    StageError,
    StageResult,
    ancestors,
    code_version,
    configured,
    descendants,
    identity,
    order,
    select,
)
from pipelines.inference.pin import pin, pin_section
from pipelines.lineage import Lineage
from pipelines.redact import redact
from pipelines.stages import STAGES
from pipelines.storage import Storage

MARKER = "_SUCCESS.json"


@dataclass
class StageOutcome:
    name: str
    state: str  # ran | reused | failed | skipped
    run_id: str | None = None
    seconds: float = 0.0
    output_uri: str | None = None
    error: str | None = None


@dataclass
class PipelineOutcome:
    run_id: str
    status: str  # FINISHED | FAILED | KILLED
    tracking_uri: str
    storage_uri: str
    stages: list[StageOutcome] = field(default_factory=list)

    @property
    def failure(self) -> StageOutcome | None:
        return next((s for s in self.stages if s.state == "failed"), None)

    def by_name(self) -> dict[str, StageOutcome]:
        return {s.name: s for s in self.stages}


def job_env_vars() -> dict[str, str]:
    """env_vars of the Ray job this driver runs in (Ray passes the job's config in this variable)."""
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not injected:
        return {}
    return (json.loads(injected).get("runtime_env") or {}).get("env_vars") or {}


def connect_ray(cfg: RayConfig, env_vars: dict[str, str]) -> str:
    """Join the cluster at ray.address / $RAY_ADDRESS, else start a local one; returns its address."""
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        # Inside a Ray job, ray.init refuses env_vars the job already sets: add only the others.
        ours = {k: v for k, v in env_vars.items() if k not in job_env_vars()}
        # worker_setup: one line instead of a Ray thread's bare traceback (pipelines.patches).
        runtime_env = {"env_vars": ours, "worker_process_setup_hook": "pipelines.patches.worker_setup"}
        common = {"runtime_env": runtime_env, "logging_level": logging.WARNING}
        if address:
            ray.init(address=address, **common)
        else:
            # "local": always a fresh cluster, never one some other `ray start` left running.
            ray.init(
                address="local",
                num_cpus=cfg.local_num_cpus or max(4, os.cpu_count() or 1),
                object_store_memory=cfg.object_store_memory_mb * 1024 * 1024,
                include_dashboard=False,
                **common,
            )
    return ray.get_runtime_context().gcs_address


def _execute(run: Callable, section, ctx: StageContext) -> StageResult:
    """The body of a stage's Ray task: clean output folder, the stage, then its marker."""
    env.configure()
    ctx.output.remove_tree()
    ctx.output.makedirs()
    result = run(section, ctx)
    ctx.output.write_json({"stage": ctx.stage, "identity": ctx.identity, "result": result.as_json()}, MARKER)
    return result


def finished_result(lineage: Lineage, ident: str, root: str = "") -> tuple[str, str, StageResult] | None:
    """(run id, output uri, result) of a finished stage run with this identity whose output is intact.
    MLflow holds the output URI redacted; the identity covers the storage root, so the root's
    credentials are the ones `root` (this run's storage URI) carries."""
    record = lineage.finished_stage(ident)
    if record is None:
        return None
    output_uri = record.output_uri.replace(redact(root), root, 1) if root else record.output_uri
    output = Storage(output_uri)
    if not output.exists(MARKER):
        return None
    marker = output.read_json(MARKER)
    if marker.get("identity") != ident:
        return None
    return record.run_id, output_uri, StageResult.from_json(marker["result"])


def stage_summary(output_uri: str) -> dict:
    """The summary a finished stage left beside its outputs."""
    return Storage(output_uri).read_json(MARKER)["result"].get("summary", {})


def pinned_sections(cfg: PipelineConfig, stages: list[Stage], tracking_uri: str) -> dict[str, tuple]:
    """stage name -> (its section with its model references pinned, {key: digest}); see
    `Stage.references`. One lookup per reference for the whole run, before any stage runs, so
    stages that name the same model (prepare's vocabulary, train's weights) read the same one."""
    pin_ref = cache(lambda ref: pin(ref, tracking_uri))
    # A reference that follows another (prepare.vocabulary_from follows train.init_from) is pinned
    # after it: a reference naming nothing is then reported under the key the user set.
    derived = {keys for keys, _ in AGREEMENTS}
    first = sorted(stages, key=lambda s: any((s.section, key) in derived for key in s.references))
    return {s.name: pin_section(getattr(cfg, s.section), s.references, pin_ref, s.section) for s in first}


def plan_state(cfg: PipelineConfig, stages: list[Stage] | None = None) -> list[tuple[Stage, str, tuple | None]]:
    """Each stage the config runs, in order, with its identity and its finished run (run id,
    output uri, result) if one with that identity exists: what `crossmodal stages` prints."""
    lineage, storage, identities, out = Lineage(cfg.mlflow), Storage(cfg.storage.root), {}, []
    ordered = order(configured(stages or STAGES, lambda s: getattr(cfg, s.section)))
    pinned = pinned_sections(cfg, ordered, lineage.uri)
    for stage in ordered:
        section, digests = pinned[stage.name]
        ident = identity(stage, section, {n: identities[n] for n in stage.needs}, storage.uri, digests)
        identities[stage.name] = ident
        out.append((stage, ident, finished_result(lineage, ident, storage.uri)))
    return out


def why_new(previous, tags: dict[str, str], params: dict[str, str]) -> str:
    """What differs from the stage's latest finished run (an MLflow run, or None): its config,
    its code or its inputs; else what the identity holds beyond them."""
    if previous is None:
        return "it never finished in this experiment"
    since = f"since run {previous.info.run_id[:8]}"
    before, params = previous.data.params, {k: redact(str(v)) for k, v in params.items()}  # recorded redacted
    changed = [key for key in sorted(set(before) | set(params)) if before.get(key) != params.get(key)]
    if changed:
        shown = ", ".join(f"{key} {before.get(key, '(unset)')} -> {params.get(key, '(unset)')}" for key in changed[:3])
        return f"its config changed {since}: {shown}" + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    if previous.data.tags.get("crossmodal.code_version") != tags.get("crossmodal.code_version"):
        return f"its code changed {since}"
    moved = [
        key.removeprefix("crossmodal.pinned.")
        for key in sorted(tags)
        if key.startswith("crossmodal.pinned.") and previous.data.tags.get(key) != tags[key]
    ]
    if moved:
        return f"the model its {', '.join(moved)} names changed {since}"
    inputs = [
        key.split(".")[2]
        for key in sorted(tags)
        if key.startswith("crossmodal.input.") and previous.data.tags.get(key) != tags[key]
    ]
    if inputs:
        return f"its input from {', '.join(sorted(set(inputs)))} changed {since}"
    return f"its external data or storage root changed {since}"


def describe_failure(err: BaseException) -> tuple[str, str]:
    """(one line for the user, full details for the error artifact)."""
    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None else err
    details = str(err) if isinstance(err, ray.exceptions.RayError) else "".join(traceback.format_exception(err))
    if isinstance(cause, (StageError, PlanError)):
        return str(cause).splitlines()[0], details
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": "), details


class Pipeline:
    """One pipeline run; `run()` does the work and returns the outcome."""

    def __init__(
        self,
        cfg: PipelineConfig,
        stages: list[Stage],
        only=None,
        from_stage=None,
        force=False,
        echo: Callable[[str], None] = print,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
    ):
        self.cfg = cfg
        self.echo = lambda line: echo(redact(line))  # lines name URIs: no credentials in the logs
        self.run_name, self.extra_tags = run_name, dict(tags or {})
        self.stages = order(configured(stages, lambda stage: getattr(cfg, stage.section)))
        self.chosen = select(self.stages, only, from_stage)
        self.needed = self.chosen | ancestors(self.stages, self.chosen)
        # Forced: what --force or --from asks to redo, never a stage outside the selection.
        self.forced = (
            set(self.chosen) if force else descendants(self.stages, {from_stage}) & self.chosen if from_stage else set()
        )
        self.storage = Storage(cfg.storage.root)
        self.identities: dict[str, str] = {}
        self.results: dict[str, StageResult] = {}

    def run(self) -> PipelineOutcome:
        self.env_vars = env.configure()
        self.lineage = lineage = Lineage(self.cfg.mlflow)
        # Before anything starts: a reference that names nothing is a one-line error, and every
        # identity of this run follows what the references name now.
        self.pinned = pinned_sections(self.cfg, self.stages, lineage.uri)
        for stage in self.stages:
            for key in stage.references:
                given, pinned = getattr(getattr(self.cfg, stage.section), key), getattr(self.pinned[stage.name][0], key)
                if given != pinned:
                    self.echo(f"[{stage.name}] {stage.section}.{key} {given} is {pinned}")
        for stale, ended in lineage.close_abandoned():
            left = f"; ended {ended} Ray processes its local cluster left" if ended else ""
            self.echo(f"marked run {stale} KILLED: its driver is gone{left}")
        plan = [s.name for s in self.stages if s.name in self.needed]
        parent = lineage.start_pipeline(
            self.cfg.name,
            yaml.safe_dump(self.cfg.model_dump(mode="json"), sort_keys=False),
            self.cfg.flat(),
            tags={
                "crossmodal.config_hash": self.cfg.digest(),
                "crossmodal.plan": ",".join(plan),
                "crossmodal.storage": self.storage.uri,
                **self.extra_tags,
            },
            run_name=self.run_name,
        )
        self.parent = parent
        outcome = PipelineOutcome(parent, "FINISHED", lineage.uri, self.storage.uri)
        self.echo(f"pipeline {self.cfg.name}: MLflow run {parent} in {lineage.uri}")
        try:
            for stage in self.stages:
                if stage.name in self.needed:
                    outcome.stages.append(self._stage(stage, lineage, parent, outcome))
        except BaseException as err:  # the driver itself broke (or was interrupted) between stages
            outcome.status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            lineage.close_open_stages(
                parent, "killed" if outcome.status == "KILLED" else "failed", describe_failure(err)[0]
            )
            raise
        finally:
            if outcome.failure is not None and outcome.status == "FINISHED":
                outcome.status = "FAILED"
            lineage.end_pipeline(parent, outcome.status)
        return outcome

    def _ray(self) -> None:
        """Connect on the first stage that must run: a fully reused pipeline needs no cluster."""
        if not ray.is_initialized():
            address = connect_ray(self.cfg.ray, self.env_vars)
            self.echo(f"Ray cluster at {address}")
        self.lineage.set_tags(self.parent, {"crossmodal.ray_address": ray.get_runtime_context().gcs_address})

    def _stage(self, stage: Stage, lineage: Lineage, parent: str, outcome: PipelineOutcome) -> StageOutcome:
        blocked = [s.name for s in outcome.stages if s.name in stage.needs and s.state in ("failed", "skipped")]
        if blocked:
            self.echo(f"[{stage.name}] skipped: needs {', '.join(blocked)}, which did not finish")
            return StageOutcome(stage.name, "skipped")
        section, pinned = self.pinned[stage.name]
        ident = identity(stage, section, {n: self.identities[n] for n in stage.needs}, self.storage.uri, pinned)
        self.identities[stage.name] = ident
        inputs = {n: self.results[n] for n in stage.needs}
        tags = {"crossmodal.code_version": code_version(stage)}
        tags |= {f"crossmodal.pinned.{key}": digest for key, digest in pinned.items()}
        tags |= {
            f"crossmodal.input.{need}.{name}": uri
            for need in stage.needs
            for name, uri in self.results[need].outputs.items()
        }
        params = {f"{stage.section}.{k}": v for k, v in flatten(section.model_dump(mode="json")).items()}
        prior = None if stage.name in self.forced else finished_result(lineage, ident, self.storage.uri)
        if prior is not None:
            prior_run, output_uri, result = prior
            run_id = lineage.start_stage(
                parent, stage.name, ident, tags | {"crossmodal.reused_from": prior_run}, params
            )
            lineage.finish_stage(run_id, "reused", output_uri, result.metrics, {}, result.as_json(), 0.0)
            self.results[stage.name] = result
            self.echo(f"[{stage.name}] reused run {prior_run} (same identity {ident[:12]}) -> {output_uri}")
            return StageOutcome(stage.name, "reused", run_id, 0.0, output_uri)
        if stage.name not in self.chosen:
            reason = why_new(lineage.latest_finished(stage.name), tags, params)
            message = (
                f"stage '{stage.name}' has no finished run with identity {ident[:12]} ({reason}) and is not "
                f"selected; the selected stages need it: run it too"
            )
            run_id = lineage.start_stage(parent, stage.name, ident, tags, params)
            lineage.fail_stage(run_id, message, message)
            self.echo(f"[{stage.name}] {message}")
            return StageOutcome(stage.name, "failed", run_id, error=message)
        return self._run_stage(stage, section, ident, inputs, lineage, parent, tags, params)

    def _run_stage(self, stage, section, ident, inputs, lineage, parent, tags, params) -> StageOutcome:
        output = self.storage.child("stages", stage.name, ident[:16])
        run_id = lineage.start_stage(parent, stage.name, ident, tags | {"crossmodal.output_uri": output.uri}, params)
        ctx = StageContext(
            stage.name, ident, self.storage, output, inputs, lineage.uri, run_id, stage.name in self.forced
        )
        self._ray()
        self.echo(f"[{stage.name}] running (identity {ident[:12]}) ...")
        started = time.perf_counter()
        task = ray.remote(num_cpus=stage.num_cpus, max_retries=0)(_execute)
        ref = task.options(name=f"stage:{stage.name}").remote(stage.run, section, ctx)
        try:
            result = ray.get(ref)
        except KeyboardInterrupt:  # run() marks this stage run KILLED with the pipeline
            ray.cancel(ref, force=True)
            raise
        except Exception as err:  # noqa: BLE001 - any stage failure is recorded, then reported
            seconds = time.perf_counter() - started
            one_line, details = describe_failure(err)
            lineage.fail_stage(run_id, one_line, details)
            self.echo(f"[{stage.name}] failed after {seconds:.1f} s: {one_line}")
            return StageOutcome(stage.name, "failed", run_id, seconds, output.uri, one_line)
        seconds = time.perf_counter() - started
        lineage.finish_stage(
            run_id, "ran", output.uri, result.metrics, result.tables, result.as_json(), seconds, result.artifacts
        )
        self.results[stage.name] = result
        self.echo(f"[{stage.name}] ran in {seconds:.1f} s -> {output.uri}")
        return StageOutcome(stage.name, "ran", run_id, seconds, output.uri)


def run_pipeline(cfg: PipelineConfig, stages: list[Stage] | None = None, **options) -> PipelineOutcome:
    return Pipeline(cfg, stages if stages is not None else STAGES, **options).run()
