"""One typed, validated config tree for a pipeline run, loaded from YAML plus `--set` overrides.

Every user mistake (unknown key, wrong type, out-of-range value, bad YAML, bad override)
becomes a `ConfigError` whose message is one line naming the file (or the `--set`), the
dotted key and what was expected, before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from pipelines.configbase import Strict
from pipelines.stages.evaluate import EvaluateConfig
from pipelines.stages.ingest import IngestConfig
from pipelines.stages.prepare import PrepareConfig
from pipelines.stages.shard import ShardConfig
from pipelines.training.config import TrainConfig


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message is a single line."""


class StorageConfig(Strict):
    root: str = Field("runs/storage", min_length=1, description="Local folder or filesystem URI (file://, s3://, gs://, hdfs://) every stage reads and writes under")


class MlflowConfig(Strict):
    tracking_uri: str | None = Field(None, description="null: $MLFLOW_TRACKING_URI, else a sqlite store under local_store")
    experiment: str = Field("crossmodal", min_length=1)
    local_store: str = Field("runs", min_length=1, description="Folder of the default sqlite store and its artifacts")


class RayConfig(Strict):
    address: str | None = Field(None, description="null: $RAY_ADDRESS, else start a local cluster; 'auto': join the one `ray start` runs here")
    # Logical CPUs of a local cluster. More than the physical cores on purpose: Ray Data and
    # the train workers each reserve CPUs, and with only 2 the probe's pipeline hung.
    local_num_cpus: int | None = Field(None, ge=1, description="null: max(4, cores)")
    object_store_memory_mb: int = Field(2048, ge=256, description="Object store cap of a local cluster")


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage: StorageConfig = StorageConfig()
    mlflow: MlflowConfig = MlflowConfig()
    ray: RayConfig = RayConfig()
    ingest: IngestConfig = IngestConfig()
    shard: ShardConfig = ShardConfig()
    prepare: PrepareConfig = PrepareConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    def digest(self) -> str:
        """sha256 of the resolved config, stable across key order and formatting."""
        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()

    def flat(self) -> dict[str, str]:
        return flatten(self.model_dump(mode="json"))


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}: the shape MLflow params take."""
    if isinstance(tree, dict) and tree:
        out: dict[str, str] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: json.dumps(tree) if isinstance(tree, (list, dict)) else str(tree)}


def parse_override(text: str) -> tuple[list[str], Any]:
    """'shard.samples_per_shard=64' -> (['shard', 'samples_per_shard'], 64); YAML typing of the value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"--set {text}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text}: value is not valid YAML ({_first_line(err)})") from None
    return key.strip().split("."), value


def apply_override(tree: dict, path: list[str], value: Any, text: str) -> None:
    node = tree
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise ConfigError(f"--set {text}: {where} is a value, not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', None) or _first_line(err)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read, override and validate; raises ConfigError with one line on any mistake."""
    path = Path(path)
    tree = read_yaml(path)
    applied: list[tuple[list[str], str]] = []
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value, text)
        applied.append((keys, text))
    return validate(tree, str(path), applied)


def validate(tree: dict, source: str, applied: list[tuple[list[str], str]] = ()) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(" ; ".join(describe(e, source, applied) for e in err.errors())) from None


def describe(error: dict, source: str, applied) -> str:
    loc = [str(part) for part in error["loc"]]
    dotted = ".".join(loc) or "(top level)"
    # An override is to blame when its key and the error's location overlap, either way round:
    # a section-level rule (fractions summing to 1) reports the section, not the key that was set.
    origin = next((f"--set {text}" for keys, text in reversed(applied)
                   if loc[: len(keys)] == keys or keys[: len(loc)] == loc), source)
    if error["type"] == "extra_forbidden":
        allowed = allowed_keys(loc[:-1])
        hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
        return f"{origin}: {dotted}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{origin}: {dotted}: required key is missing"
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{origin}: {dotted}: {message[0].lower()}{message[1:]}{shown}"


def allowed_keys(loc: list[str]) -> list[str]:
    """The field names of the model at a dotted location, for 'unknown key' messages."""
    model: Any = PipelineConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}))


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
