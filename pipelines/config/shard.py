"""The shard section: shard size and the train/val/test split by key hash."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from pipelines.config.base import Strict


class ShardConfig(Strict):
    samples_per_shard: int = Field(256, ge=1, le=10_000_000)
    # Fractions by split name; along the key-hash line [0, 1) in name order.
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})

    @field_validator("splits")
    @classmethod
    def _fractions(cls, splits: dict[str, float]) -> dict[str, float]:
        if not splits:
            raise ValueError("at least one split is required")
        for name, fraction in splits.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"split name '{name}' must be lower-case letters, digits or '_'")
            if not 0 < fraction <= 1:
                raise ValueError(f"split '{name}' fraction must be in (0, 1], got {fraction}")
        if abs(sum(splits.values()) - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {sum(splits.values()):g}")
        return splits
