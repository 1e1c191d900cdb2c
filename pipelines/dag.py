"""Stages, their dependencies, the run plan and each stage's identity. No Ray, no MLflow here.

A stage is a typed config section plus one function `run(section, ctx) -> StageResult`. The
runner (`pipelines.runner`) orders the stages, decides which to run, and runs each as Ray
work; this module holds the pure parts so they are easy to test and to reason about.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from pydantic import BaseModel

from pipelines.storage import Storage


class PlanError(ValueError):
    """A stage selection or registry mistake; the message is a single line."""


class StageError(Exception):
    """A stage cannot do its work because of its input or config (a user mistake, not a bug).

    The runner shows its message as it is, on one line, without a traceback."""


@dataclass
class StageResult:
    """What a stage hands to the runner and to the stages after it."""

    outputs: dict[str, str] = field(default_factory=dict)  # name -> location (URI)
    metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # small, JSON-able facts for dependants
    tables: dict[str, list[dict]] = field(default_factory=dict)  # logged as MLflow table artifacts
    artifacts: dict[str, str] = field(default_factory=dict)  # MLflow artifact path -> file URI in storage

    def as_json(self) -> dict:
        return {"outputs": self.outputs, "metrics": self.metrics, "summary": self.summary}

    @classmethod
    def from_json(cls, data: dict) -> StageResult:
        return cls(outputs=data.get("outputs", {}), metrics=data.get("metrics", {}), summary=data.get("summary", {}))


@dataclass
class StageContext:
    """Everything a stage function may use besides its own config section."""

    stage: str
    identity: str
    storage: Storage  # the pipeline's storage root
    output: Storage  # this stage's own folder below the root (emptied before it runs)
    inputs: dict[str, StageResult]  # results of the stages it needs, by name
    tracking_uri: str  # MLflow, for stages that log while they run (by run id)
    run_id: str
    forced: bool = False  # --force / --from: start over, do not resume state an earlier run left


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[BaseModel, StageContext], StageResult]
    section: str  # the config section this stage reads
    needs: tuple[str, ...] = ()
    # Modules besides the stage function's own whose source is part of the stage's identity.
    code: tuple[str, ...] = ()
    # CPUs the stage's own Ray task holds. Stages that fan work out to Ray tasks, Ray Data or
    # Ray Train hold none themselves, so their children can use every CPU.
    num_cpus: float = 0.0
    # What the stage reads from outside the pipeline (a user's folder of files): a digest of it,
    # computed on the driver, so changed data means a new identity and the stage runs again.
    fingerprint: Callable[[BaseModel], str] | None = None


def order(stages: list[Stage]) -> list[Stage]:
    """Topological order, stable with respect to the registry order; rejects bad registries."""
    by_name: dict[str, Stage] = {}
    for stage in stages:
        if stage.name in by_name:
            raise PlanError(f"stage '{stage.name}' is registered twice")
        by_name[stage.name] = stage
    for stage in stages:
        for need in stage.needs:
            if need not in by_name:
                raise PlanError(f"stage '{stage.name}' needs '{need}', which is not a stage")
    done: list[Stage] = []
    visiting: set[str] = set()

    def visit(stage: Stage, path: tuple[str, ...]) -> None:
        if stage in done:
            return
        if stage.name in visiting:
            raise PlanError(f"stages form a cycle: {' -> '.join(path + (stage.name,))}")
        visiting.add(stage.name)
        for need in stage.needs:
            visit(by_name[need], path + (stage.name,))
        visiting.discard(stage.name)
        done.append(stage)

    for stage in stages:
        visit(stage, ())
    return done


def descendants(ordered: list[Stage], roots: set[str]) -> set[str]:
    found = set(roots)
    for stage in ordered:  # topological order: one pass sees every path
        if any(need in found for need in stage.needs):
            found.add(stage.name)
    return found


def ancestors(ordered: list[Stage], names: set[str]) -> set[str]:
    by_name = {s.name: s for s in ordered}
    found: set[str] = set()
    todo = list(names)
    while todo:
        for need in by_name[todo.pop()].needs:
            if need not in found:
                found.add(need)
                todo.append(need)
    return found


def select(ordered: list[Stage], only: list[str] | None = None, from_stage: str | None = None) -> set[str]:
    """Names of the stages to run: all, `--only a,b`, or `--from s` (s and all after it)."""
    names = [s.name for s in ordered]
    for name in (only or []) + ([from_stage] if from_stage else []):
        if name not in names:
            raise PlanError(f"unknown stage '{name}' (stages: {', '.join(names)})")
    chosen = set(names)
    if only:
        chosen &= set(only)
    if from_stage:
        chosen &= descendants(ordered, {from_stage})
    if not chosen:
        raise PlanError("--only and --from leave no stage to run")
    return chosen


@cache
def source_digest(module_name: str) -> str:
    return hashlib.sha256(inspect.getsource(importlib.import_module(module_name)).encode()).hexdigest()


def code_version(stage: Stage) -> str:
    """Hash of the stage function's module and the modules it declares: its code version."""
    modules = sorted({stage.run.__module__, *stage.code})
    return hashlib.sha256("".join(source_digest(m) for m in modules).encode()).hexdigest()[:16]


def identity(stage: Stage, section: BaseModel, input_identities: dict[str, str], storage_uri: str) -> str:
    """Same identity <=> same config section, code, inputs, external data and storage root."""
    payload = {
        "stage": stage.name,
        "config": section.model_dump(mode="json"),
        "code": code_version(stage),
        "inputs": dict(sorted(input_identities.items())),
        "external": stage.fingerprint(section) if stage.fingerprint else "",
        "storage": storage_uri,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
