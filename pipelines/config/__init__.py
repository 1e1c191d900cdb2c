"""One typed, validated config tree for a pipeline run, loaded from YAML plus `--set` overrides.

Every section's schema lives in this package, which imports only pydantic, PyYAML, the
standard library and the model library's plain dataclasses (`model.config`): loading a
config never imports Ray, torch, webdataset or MLflow. Every user mistake (unknown key, wrong
type, out-of-range value, bad YAML, bad override, sections that disagree) becomes a
`ConfigError` whose message is one line naming the file (or the `--set`), the dotted key and
what was expected, before anything runs.
"""

from __future__ import annotations

import os

from pipelines.config.file import ConfigError, load_section, read_tree, validate_as
from pipelines.config.pipeline import PipelineConfig, canonical_json, flatten
from pipelines.config.services import MlflowConfig, RayConfig, StorageConfig

__all__ = [
    "ConfigError",
    "MlflowConfig",
    "PipelineConfig",
    "RayConfig",
    "canonical_json",
    "flatten",
    "load_config",
    "load_section",
    "StorageConfig",
    "validate",
]


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read, override and validate; raises ConfigError with one line on any mistake."""
    tree, applied = read_tree(path, overrides)
    return validate(tree, str(path), applied)


def validate(tree: dict, source: str, applied: list[tuple[list[str], str]] = ()) -> PipelineConfig:
    return validate_as(PipelineConfig, tree, source, applied)
