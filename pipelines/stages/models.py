"""What stages that produce or read models share: the prepared spec, storing a model folder
under the storage root and reading one back."""

from __future__ import annotations

import tempfile

from model.io import SavedModel, save
from pipelines.dag import StageContext, StageError
from pipelines.data.dataset import DatasetSpec
from pipelines.storage import Storage


def prepared_spec(ctx: StageContext) -> DatasetSpec:
    return DatasetSpec(**Storage(ctx.inputs["prepare"].outputs["spec"]).read_json())


def store_model(saved: SavedModel, target: Storage) -> str:
    """Write the model folder locally, then copy it to the storage root (any filesystem)."""
    with tempfile.TemporaryDirectory() as folder:
        save(saved, folder)
        return target.upload(folder)


def model_artifacts(uri: str, prefix: str = "model") -> dict[str, str]:
    """MLflow artifact path -> file URI, for every file of a stored model folder."""
    store = Storage(uri)
    return {f"{prefix}/{relative}": store.child(relative).uri for relative in store.list_files()}


def check_micro_batch(cfg, spec: DatasetSpec, section: str) -> None:
    """Before minutes of set-up: a micro-batch larger than a worker's share of the train split
    would give no full batch at all."""
    per_worker = sum(spec.profile.get("combinations", {}).values()) // cfg.workers
    if spec.profile and per_worker < cfg.micro_batch:
        raise StageError(
            f"{section}.micro_batch: {cfg.micro_batch} per worker, but the train split has {per_worker} "
            f"samples for each of {cfg.workers} workers: set it to {max(1, per_worker // 2)} or less"
        )
