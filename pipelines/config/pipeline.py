"""The whole config tree of a pipeline run, and the rules that tie its sections together."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import Field, model_validator

from pipelines.config.base import AgreementError, Strict
from pipelines.config.compress import DistillConfig, PruneConfig, QuantizeConfig, RegisterConfig
from pipelines.config.evaluate import EvaluateConfig
from pipelines.config.ingest import IngestConfig
from pipelines.config.nightly import NightlyConfig
from pipelines.config.prepare import PrepareConfig
from pipelines.config.services import MlflowConfig, RayConfig, StorageConfig
from pipelines.config.shard import ShardConfig
from pipelines.config.train import TrainConfig, chosen_model

# (section, key) pairs whose value is another's: (derived, source). The derived key may be left
# out (it is filled in) or given the same value; a different value is an error naming both.
AGREEMENTS = (
    (("ingest", "demo", "image_size"), ("prepare", "image_size")),
    (("ingest", "demo", "sample_rate"), ("prepare", "sample_rate")),
    (("ingest", "demo", "audio_seconds"), ("prepare", "max_audio_seconds")),
    (("prepare", "max_member_mb"), ("ingest", "max_member_mb")),
    # A model trains on token ids and answer indices of its own vocabulary.
    (("prepare", "vocabulary_from"), ("train", "init_from")),
    # Every model is scored on the same split and samples: one candidate set for all.
    *(
        ((stage, key), ("evaluate", key))
        for stage in ("distill", "prune", "quantize")
        for key in ("split", "max_samples")
    ),
    # The nightly guards the model the register stage registers.
    (("nightly", "model"), ("registry", "name")),
)


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
    distill: DistillConfig = DistillConfig()
    prune: PruneConfig = PruneConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    registry: RegisterConfig = RegisterConfig()
    nightly: NightlyConfig = NightlyConfig()

    @model_validator(mode="after")
    def _sections_agree(self):
        tree = self.model_dump()
        for derived, source in AGREEMENTS:
            value, wanted = lookup(tree, derived), lookup(tree, source)
            if value is not None and value != wanted:
                raise AgreementError(
                    f"{'.'.join(derived)} is {value} but {'.'.join(source)} is {wanted}: they must agree "
                    f"(leave {'.'.join(derived)} out: it follows {'.'.join(source)})",
                    (".".join(derived), ".".join(source)),
                )
            assign(tree, derived, wanted)
        # The sections are frozen: the filled-in ones replace them in this (new) tree.
        for name in {derived[0] for derived, _ in AGREEMENTS}:
            self.__dict__[name] = type(getattr(self, name)).model_validate(tree[name])
        self._model_fits_the_data()
        return self

    def _model_fits_the_data(self) -> None:
        """The models train.model and distill.model choose must be buildable at the sizes
        prepare decodes to."""
        for name in ("train", "distill"):
            section = getattr(self, name)
            if name == "distill" and not section.enabled:
                continue
            try:
                chosen_model(section, **self.prepare.model_sizes())
            except (ValueError, TypeError) as err:
                raise AgreementError(
                    f"{name}.model does not fit the prepared data: {err}", (f"{name}.model", "prepare.image_size")
                ) from None

    def digest(self) -> str:
        """sha256 of the resolved config, stable across key order and formatting."""
        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()

    def flat(self) -> dict[str, str]:
        return flatten(self.model_dump(mode="json"))


def lookup(tree: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        tree = tree[key]
    return tree


def assign(tree: dict, keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree[key]
    tree[keys[-1]] = value


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
