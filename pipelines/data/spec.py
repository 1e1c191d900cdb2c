"""DatasetSpec: everything needed to rebuild the prepared stream anywhere (JSON in prepare's output).

Kept apart from the Ray Data code so the standalone trainer can read it on a machine without Ray.
"""

from __future__ import annotations

from pydantic import BaseModel

from pipelines.config.prepare import AugmentConfig
from pipelines.data.decode import DecodeSettings


class DatasetSpec(BaseModel):
    shards: dict[str, list[str]]  # split -> shard URIs
    materialized: dict[str, str] = {}  # split -> Parquet folder URI of decoded samples
    decode: dict  # DecodeSettings fields
    tokenizer_json: str
    answers: list[str]
    max_text_len: int
    augment: AugmentConfig
    multiplicity: dict[str, float]
    weights: dict[str, float]
    seed: int
    member_limit: int
    batch_size: int = 32
    data_cpus: float = 2.0
    profile: dict = {}  # what the data holds (pipelines.data.profile), for the stages' own checks

    @property
    def settings(self) -> DecodeSettings:
        return DecodeSettings(**self.decode)
