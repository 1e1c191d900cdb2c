"""The nightly section: what `crossmodal nightly` (jobs/nightly.py) does around a pipeline run:
look for new data, warm-start, score on the frozen benchmark, and the promotion gate (F19, F20).
The pipeline's own stages never read it."""

from __future__ import annotations

from pydantic import Field, field_validator

from pipelines.config.base import Strict

# Figures where less is better: cost, and robustness drops (how much a metric falls when a
# modality is removed). Every other figure is better when higher.
LOWER_IS_BETTER_PREFIXES = ("robustness.",)
COST_FIGURES = ("latency_b1_ms", "latency_b32_ms", "size_mb", "parameters", "peak_memory_mb")


def higher_is_better(metric: str) -> bool:
    return metric not in COST_FIGURES and not metric.startswith(LOWER_IS_BETTER_PREFIXES)


class GateConfig(Strict):
    """The challenger becomes champion only if it beats the champion on every `metrics` entry by
    at least its margin, and loses on no `guarded` entry by more than its tolerance. Both
    models are scored on the frozen benchmark by the same code in the same process."""

    metrics: dict[str, float] = Field(
        default_factory=lambda: {
            "retrieval.text_to_image.r1": 0.005,
            "retrieval.image_to_text.r1": 0.005,
        },
        description="metric -> margin the challenger must win by (absolute; a tie within it is no win)",
    )
    guarded: dict[str, float] = Field(
        default_factory=lambda: {
            "latency_b32_ms": 0.10,
            "size_mb": 0.05,
            "retrieval.audio_to_text.r1": 0.02,
            "vqa.image_audio.exact": 0.02,
            "robustness.vqa.without_image.exact": 0.05,
        },
        description="metric -> how much worse the challenger may be: a fraction of the champion's "
        "value for cost figures (latency, size, parameters, memory), absolute for the rest",
    )

    @field_validator("metrics")
    @classmethod
    def _margins_positive(cls, value: dict[str, float]) -> dict[str, float]:
        if not value:
            raise ValueError("name at least one metric the challenger must win on")
        bad = [name for name, margin in value.items() if not margin > 0]
        if bad:
            raise ValueError(f"margins must be > 0 (a tie is no win): {', '.join(bad)}")
        return value

    @field_validator("guarded")
    @classmethod
    def _tolerances_not_negative(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [name for name, tolerance in value.items() if tolerance < 0]
        if bad:
            raise ValueError(f"tolerances must be >= 0: {', '.join(bad)}")
        return value


class BenchmarkConfig(Strict):
    """The frozen benchmark: the test split of the first nightly, copied aside with the sha256
    of every file, never changed by new data; a nightly refuses to score on it if it changed."""

    split: str = Field("test", min_length=1, description="the split of the first nightly that is frozen")
    folder: str | None = Field(None, description="null: <storage.root>/benchmark/<registered model name>")
    max_samples: int | None = Field(None, ge=1, description="score on the first N samples (null: all)")


class NightlyConfig(Strict):
    model: str | None = Field(None, description="registered model the gate guards; follows registry.name")
    champion_alias: str = Field("champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    warm_start: bool = Field(False, description="train from the champion's weights instead of from scratch")
    lease_seconds: float = Field(
        180.0, ge=10, description="the nightly's lock expires this long after its holder's last renewal"
    )
    benchmark: BenchmarkConfig = BenchmarkConfig()
    gate: GateConfig = GateConfig()
