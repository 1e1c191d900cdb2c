"""Where a pipeline runs: its storage root, its MLflow store, its Ray cluster."""

from __future__ import annotations

from pydantic import Field

from pipelines.config.base import Strict


class StorageConfig(Strict):
    root: str = Field(
        "runs/storage",
        min_length=1,
        description="Local folder or filesystem URI (file://, s3://, gs://, hdfs://) every stage uses",
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
