"""The compression sections: distill, prune, quantize, and registry (the register stage's; F13-F15, F18).

Each is off unless `enabled: true` (the demo turns them all on). Distill and prune train
through the train stage's loop, so their sections are the loop's (`LoopConfig`) plus their own
keys. Every compression stage scores its model with the evaluate stage's code on the same
split and samples (`split` and `max_samples` follow the evaluate section).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from model.config import DistillWeights
from pipelines.config.base import Strict, section_from_dataclass
from pipelines.config.train import LoopConfig, ModelChoice

ROUTES = ("torch_int8", "onnx_int8")


class KD(section_from_dataclass(DistillWeights, "KDBase", "Weights of the distillation losses")):
    def weights(self) -> DistillWeights:
        return DistillWeights(**self.model_dump())


class Measure(Strict):
    """How every compression stage measures a model's CPU cost (the serving path: embeddings of
    text, image and audio)."""

    threads: int = Field(2, ge=1, description="torch / onnxruntime threads for the latency figures")
    repeats: int = Field(10, ge=3, description="timed runs per batch size, after warm-up; the median is logged")


class Scored(Strict):
    """Where a compression stage scores its model: the evaluate section's split and samples."""

    split: str | None = Field(None, description="follows evaluate.split")
    max_samples: int | None = Field(None, ge=1, description="follows evaluate.max_samples")
    measure: Measure = Measure()


class DistillConfig(LoopConfig, Scored):
    enabled: bool = False
    teacher: str | None = Field(
        None, description="null: the train stage's model; else a folder, runs:/<id>/model or models:/<name>@<alias>"
    )
    model: ModelChoice = Field(
        ModelChoice(size="tiny", image_encoder="conv"), description="the student (its sizes follow the data)"
    )
    kd: KD = KD()
    max_steps: int = Field(2000, ge=1)
    max_minutes: float | None = Field(3.0, gt=0)


class PruneConfig(LoopConfig, Scored):
    """Structured pruning, then a short recovery fine-tune through the training loop."""

    enabled: bool = False
    source: Literal["distill", "train"] = Field("distill", description="the stage whose model is pruned")
    heads: float = Field(0.5, ge=0, lt=1, description="share of attention heads removed in every block")
    mlp: float = Field(0.5, ge=0, lt=1, description="share of MLP hidden channels removed in every block")
    conv: float = Field(0.5, ge=0, lt=1, description="share of the conv image tower's inner channels removed")
    importance: Literal["taylor", "l1", "l2"] = Field(
        "taylor",
        description="taylor: |weight x gradient| of the loss over calibration batches; l1/l2: weight magnitude",
    )
    calibration_batches: int = Field(8, ge=1, description="train batches of the importance pass")
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(20, ge=0)
    max_steps: int = Field(300, ge=0, description="recovery fine-tune steps (0: none)")
    max_minutes: float | None = Field(2.0, gt=0)


class QuantizeConfig(Scored):
    enabled: bool = False
    source: Literal["prune", "distill", "train"] = Field("prune", description="the stage whose model is quantized")
    routes: list[Literal[ROUTES]] = Field(list(ROUTES), min_length=1, description="INT8 routes measured side by side")
    max_recall_drop: float = Field(
        0.01, ge=0, le=1, description="a route is kept only if text-to-image recall@1 drops by at most this"
    )
    calibration_batches: int = Field(4, ge=1, description="train batches for static INT8 calibration")
    batch_size: int = Field(32, ge=1)


class RegisterConfig(Strict):
    enabled: bool = False
    source: Literal["quantize", "prune", "distill", "train"] = Field(
        "quantize", description="the stage whose model is registered"
    )
    name: str = Field("crossmodal", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="registered model name")
    alias: str = Field("challenger", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
