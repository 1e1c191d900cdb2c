"""The ingest section: where samples come from, and the demo world's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines.config.base import Strict

SOURCES = ("demo", "folder", "jsonl", "shards")
# Probability of a demo scene with 1, 2 (, 3) shapes; pipelines/data/demo_world.py says why.
SHAPE_COUNTS = (0.1, 0.9)
DEFAULT_MEMBER_MB = 64.0


class DemoWorldConfig(Strict):
    num_samples: int = Field(6000, ge=1, le=50_000_000)
    seed: int = Field(0, ge=0)
    # Drawn at the sizes prepare decodes to: the pipeline fills these from prepare.image_size,
    # prepare.sample_rate and prepare.max_audio_seconds (a different value is an error).
    image_size: int | None = Field(None, ge=24, le=1024, description="from prepare.image_size")
    sample_rate: int | None = Field(None, ge=4000, le=48000, description="from prepare.sample_rate")
    audio_seconds: float | None = Field(None, gt=0.1, le=30.0, description="from prepare.max_audio_seconds")
    image_format: Literal["jpg", "png"] = "jpg"
    audio_format: Literal["wav", "flac"] = "flac"
    missing_image: float = Field(0.10, ge=0.0, le=1.0)
    missing_audio: float = Field(0.15, ge=0.0, le=1.0)
    shape_counts: list[float] = Field(
        list(SHAPE_COUNTS), min_length=1, max_length=3, description="probability of a scene with 1, 2, 3 shapes"
    )

    @model_validator(mode="after")
    def _fractions(self):
        if any(p < 0 for p in self.shape_counts) or sum(self.shape_counts) <= 0:
            raise ValueError("shape_counts must be non-negative with a positive sum")
        if self.missing_image + self.missing_audio > 1.0:
            raise ValueError("missing_image + missing_audio must be at most 1")
        return self


class IngestConfig(Strict):
    source: Literal[SOURCES] = "demo"
    path: str | None = Field(None, description="folder, manifest file or shard folder/file (local path or URI)")
    samples_per_part: int = Field(1000, ge=1, le=1_000_000)
    max_member_mb: float = Field(
        DEFAULT_MEMBER_MB, gt=0.0, le=4096.0, description="larger members are rejected (prepare too)"
    )
    demo: DemoWorldConfig = DemoWorldConfig()

    @model_validator(mode="after")
    def _path_for_user_data(self):
        if self.source != "demo" and not self.path:
            raise ValueError(f"path is required when source is '{self.source}'")
        return self

    @property
    def member_limit(self) -> int:
        return int(self.max_member_mb * 2**20)
