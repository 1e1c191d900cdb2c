"""One typed, validated config tree for a pipeline run, loaded from YAML plus `--set` overrides.

Every user mistake (unknown key, wrong type, out-of-range value, bad YAML, bad override)
becomes a `ConfigError` whose message is one line naming the file (or the `--set`), the
dotted key and what was expected, before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from pydantic import Field

from pipelines.configbase import Strict
from pipelines.configfile import ConfigError, read_tree, validate_as  # noqa: F401 - ConfigError is imported from here
from pipelines.stages.evaluate import EvaluateConfig
from pipelines.stages.ingest import IngestConfig
from pipelines.stages.prepare import PrepareConfig
from pipelines.stages.shard import ShardConfig
from pipelines.training.config import TrainConfig


class StorageConfig(Strict):
    root: str = Field(
        "runs/storage",
        min_length=1,
        description="Local folder or filesystem URI (file://, s3://, gs://, hdfs://) every stage reads and writes under",
    )


class MlflowConfig(Strict):
    tracking_uri: str | None = Field(
        None, description="null: $MLFLOW_TRACKING_URI, else a sqlite store under local_store"
    )
    experiment: str = Field("crossmodal", min_length=1)
    local_store: str = Field("runs", min_length=1, description="Folder of the default sqlite store and its artifacts")


class RayConfig(Strict):
    address: str | None = Field(
        None, description="null: $RAY_ADDRESS, else start a local cluster; 'auto': join the one `ray start` runs here"
    )
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


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read, override and validate; raises ConfigError with one line on any mistake."""
    tree, applied = read_tree(path, overrides)
    return validate(tree, str(path), applied)


def validate(tree: dict, source: str, applied: list[tuple[list[str], str]] = ()) -> PipelineConfig:
    return validate_as(PipelineConfig, tree, source, applied)
