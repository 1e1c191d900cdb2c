"""The train section of the config: model choice, DeepSpeed, schedule, validation, fault drills."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from model.config import ModelConfig, model_config
from model.objectives import LossWeights
from pipelines.configbase import Strict


class ModelChoice(Strict):
    size: Literal["tiny", "small", "base"] = "small"
    fusion: Literal["early", "late", "hierarchical"] = "hierarchical"
    image_encoder: Literal["vit", "conv"] = "vit"
    modality_dropout: float = Field(0.15, ge=0, le=1)
    overrides: dict = Field(
        default_factory=dict, description="other ModelConfig fields, e.g. {decoder: {width: 128, depth: 2, heads: 4}}"
    )


class Losses(Strict):
    """Task weights of the multi-task objective (model.objectives.LossWeights)."""

    contrastive: float = Field(1.0, ge=0)
    matching: float = Field(0.5, ge=0)
    masked_text: float = Field(0.5, ge=0)
    masked_image: float = Field(0.25, ge=0)
    masked_audio: float = Field(0.25, ge=0)
    caption: float = Field(1.0, ge=0)
    answer: float = Field(0.5, ge=0)
    vqa: float = Field(1.0, ge=0)
    text_mask_ratio: float = Field(0.15, gt=0, lt=1)
    patch_mask_ratio: float = Field(0.6, gt=0, lt=1)
    hard_negative_weight: float = Field(
        1.0, ge=1, description="each hard negative caption counts as this many negatives"
    )

    def weights(self) -> LossWeights:
        return LossWeights(**self.model_dump())


class FaultDrill(Strict):
    """Kill `rank` when it reaches `step` (once per training run: not again after recovery)."""

    rank: int | None = Field(None, ge=0)
    step: int | None = Field(None, ge=1)


class TrainConfig(Strict):
    model: ModelChoice = ModelChoice()
    losses: Losses = Losses()
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["bf16", "bf16-mixed", "fp16", "fp32"] = Field(
        "bf16",
        description="bf16: bf16 weights (fp32 master copy in the optimizer); bf16-mixed: fp32 weights, bf16 autocast",
    )
    micro_batch: int = Field(32, ge=1, description="per worker")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(2000, ge=1, description="optimizer steps")
    max_minutes: float | None = Field(
        None, gt=0, description="stop early (with a checkpoint) after this much training time"
    )
    clip: float = Field(1.0, gt=0)
    offload_optimizer: bool = False
    log_every: int = Field(10, ge=1)
    val_every: int = Field(200, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)
    shuffle_buffer: int = Field(256, ge=0)
    stream_epochs: int = Field(
        1,
        ge=1,
        description="data epochs per pass of the Ray Data stream: the pipeline drains "
        "and refills between passes (seconds on a small machine), not between these epochs",
    )
    seed: int = Field(0, ge=0)
    fault: FaultDrill = FaultDrill()
    deepspeed: dict = Field(
        default_factory=dict,
        description="laid over the generated DeepSpeed config, e.g. {zero_optimization: {reduce_bucket_size: 500000000}}",
    )


def model_config_for(cfg: TrainConfig, spec, tokenizer) -> ModelConfig:
    """The model the data fits: vocabulary, answers, image size and audio length come from prepare."""
    decode = spec.settings
    return model_config(
        cfg.model.size,
        vocab_size=tokenizer.vocab_size,
        num_answers=max(1, len(spec.answers)),
        max_text_len=spec.max_text_len,
        image_size=decode.image_size,
        sample_rate=decode.sample_rate,
        audio_seconds=decode.max_audio_seconds,
        fusion=cfg.model.fusion,
        image_encoder=cfg.model.image_encoder,
        modality_dropout=cfg.model.modality_dropout,
        **cfg.model.overrides,
    )
