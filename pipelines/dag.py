"""Stages, their dependencies, the run plan and each stage's identity. No Ray, no MLflow here.

A stage is a typed config section plus one function `run(section, ctx) -> StageResult`. The
runner (`pipelines.runner`) orders the stages, decides which to run, and runs each as Ray
work; this module holds the pure parts so they are easy to test and to reason about.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pipelines.errors import UserError
from pipelines.storage import Storage


class PlanError(UserError):
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
    # CPUs the stage's own Ray task holds. Stages that fan work out to Ray tasks, Ray Data or
    # Ray Train hold none themselves, so their children can use every CPU.
    num_cpus: float = 0.0
    # What the stage reads from outside the pipeline (a user's folder of files): a digest of it,
    # computed on the driver, so changed data means a new identity and the stage runs again.
    fingerprint: Callable[[BaseModel], str] | None = None
    # Which of `needs` this config uses (a compression stage's `source` picks one of several);
    # None: all of them. `needs` lists every possible input, so the registry orders them all.
    uses: Callable[[BaseModel], tuple[str, ...]] | None = None
    # Keys of the section that name a model outside the pipeline (a folder, runs:/, models:/).
    # What one names can change under the same name (an alias moves), so the runner pins each
    # before any identity (`pipelines.inference.pin`): the stage reads the pinned reference and
    # its identity follows what that names.
    references: tuple[str, ...] = ()


def configured(stages: list[Stage], section_of: Callable[[Stage], BaseModel]) -> list[Stage]:
    """The stages a config runs: those whose section says `enabled: false` left out, each with
    only the inputs its section uses. A stage that uses a left-out one is a one-line error."""
    enabled = [s for s in stages if getattr(section_of(s), "enabled", True)]
    names = {s.name for s in enabled}
    out = []
    for stage in enabled:
        needs = stage.uses(section_of(stage)) if stage.uses else stage.needs
        for need in needs:
            if need not in names and need in {s.name for s in stages}:
                raise PlanError(
                    f"stage '{stage.name}' uses '{need}', which is off ({need}'s section has enabled: false): "
                    f"turn it on or choose another {stage.section}.source"
                )
        out.append(replace(stage, needs=tuple(needs)))
    return out


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


# Top-level packages of this project: the code a stage's identity follows.
PROJECT_PACKAGES = ("model", "pipelines", "jobs")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def module_file(name: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The source file of a project module (a package's __init__.py), or None if it is not one."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(name: str, root: Path = PROJECT_ROOT) -> set[str]:
    """The project modules `name` imports (see `imports_in`)."""
    path = module_file(name, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return imports_in(path, package, root)


def imports_in(path: Path, package: str, root: Path = PROJECT_ROOT) -> set[str]:
    """The project modules a source file imports anywhere (inside functions too): `from a.b
    import c` names the module a.b.c when it is one, else a.b; `package` resolves relative
    imports. A package's __init__ counts only when something is imported from it by name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 parents
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if module_file(f"{base}.{alias.name}", root) else base for alias in node.names
            ]
        else:
            continue
        found |= {t for t in targets if t.split(".")[0] in PROJECT_PACKAGES and module_file(t, root)}
    return found


def import_closure(name: str, root: Path = PROJECT_ROOT) -> list[str]:
    """`name` and every project module it imports, directly or through others."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(project_imports(current, root) - seen)
    return sorted(seen)


def code_digest(modules: list[str], root: Path = PROJECT_ROOT) -> str:
    digest = hashlib.sha256()
    for name in modules:
        digest.update(name.encode() + b"\0" + module_file(name, root).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@cache
def code_version(stage: Stage) -> str:
    """Hash of the source of every project module the stage's function imports, followed
    transitively: a change anywhere in the code the stage runs makes a new identity. A stage
    defined outside the project (a script, a notebook's module) adds its own file."""
    name = stage.run.__module__
    spec = getattr(sys.modules.get(name), "__spec__", None)
    if name == "__main__" and spec is not None:
        name = spec.name  # `python -m package.module`: the module it is, as when imported
    if module_file(name) is not None:
        return code_digest(import_closure(name))
    path = Path(inspect.getsourcefile(stage.run))
    package = spec.parent if spec is not None else ""
    modules = sorted({m for imported in imports_in(path, package) for m in import_closure(imported)})
    return hashlib.sha256(path.read_bytes() + code_digest(modules).encode()).hexdigest()[:16]


def identity(
    stage: Stage,
    section: BaseModel,
    input_identities: dict[str, str],
    storage_uri: str,
    pinned: dict[str, str] | None = None,
) -> str:
    """Same identity <=> same config section, code, inputs, external data, storage root and
    models its references name (`pinned`: key -> digest, for a section with its references pinned)."""
    payload = {
        "stage": stage.name,
        "config": section.model_dump(mode="json"),
        "code": code_version(stage),
        "inputs": dict(sorted(input_identities.items())),
        "external": stage.fingerprint(section) if stage.fingerprint else "",
        "storage": storage_uri,
    }
    if pinned:  # only then: the identities of stages without references stay as they were
        payload["pinned"] = dict(sorted(pinned.items()))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
