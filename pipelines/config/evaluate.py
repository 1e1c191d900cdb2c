"""The evaluate section: which model, which split, generation settings, and the content filter."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from pipelines.config.base import Strict


class SafetyConfig(Strict):
    enabled: bool = True
    blocklist: list[str] = Field(default_factory=list, description="extra words or phrases to block")
    blocklist_file: str | None = Field(None, description="one word or phrase per line; null: the shipped list")
    rules: list[str] = Field(default_factory=list, description="regular expressions, matched on the lower-cased text")
    classifier: str | None = Field(
        None, pattern=r"^[\w.]+:\w+$", description="'module:function' returning a score in [0, 1] for a text"
    )
    threshold: float = Field(0.5, ge=0, le=1, description="classifier score at or above which a text is blocked")
    replacement: str = Field("[withheld by the content filter]", min_length=1)

    @field_validator("rules")
    @classmethod
    def _compiles(cls, rules: list[str]) -> list[str]:
        for rule in rules:
            try:
                re.compile(rule)
            except re.error as err:
                raise ValueError(f"invalid regular expression {rule!r}: {err}") from None
        return rules


class EvaluateConfig(Strict):
    model: str | None = Field(
        None, description="null: the train stage's model; else a folder, runs:/<id>/model or models:/<name>@<alias>"
    )
    split: str = Field("test", min_length=1)
    batch_size: int = Field(64, ge=1)
    beam_size: int = Field(1, ge=1, le=16, description="beam width for captions (1 = greedy)")
    max_caption_tokens: int = Field(32, ge=4, le=256)
    max_samples: int | None = Field(None, ge=1, description="evaluate the first N samples of the split only")
    table_rows: int = Field(200, ge=0, description="samples in the examples table")
    # The content filter generated text passes; the CLI applications read it from here too.
    safety: SafetyConfig = SafetyConfig()
