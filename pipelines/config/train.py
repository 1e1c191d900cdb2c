"""The train section: model choice, task weights, DeepSpeed, schedule, validation, fault drills.

The model choice and the task weights come from the model library's own dataclasses
(`model.config`: standard library only), so a default or a bound is written once.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from pydantic import Field, field_validator

from model.config import FUSIONS, IMAGE_ENCODERS, LORA_TARGETS, SIZES, LossWeights, ModelConfig
from model.config import model_config as registered_size
from pipelines.config.base import Strict, section_from_dataclass
from pipelines.config.reference import FORMS, model_reference

# ModelConfig fields that follow the prepared data, never set by hand in `overrides`.
FROM_DATA = ("vocab_size", "num_answers", "max_text_len", "image_size", "sample_rate", "audio_seconds")
# ModelConfig fields ModelChoice names itself.
CHOSEN = ("size", "fusion", "image_encoder", "modality_dropout")
DEFAULT = ModelConfig()


class ModelChoice(Strict):
    size: Literal[tuple(SIZES)] = "small"
    fusion: Literal[FUSIONS] = DEFAULT.fusion
    image_encoder: Literal[IMAGE_ENCODERS] = DEFAULT.image_encoder
    modality_dropout: float = Field(DEFAULT.modality_dropout, ge=0, le=1)
    overrides: dict = Field(
        default_factory=dict, description="other ModelConfig fields, e.g. {decoder: {width: 128, depth: 2, heads: 4}}"
    )

    @field_validator("overrides")
    @classmethod
    def _model_fields(cls, overrides: dict) -> dict:
        known = {f.name for f in dataclasses.fields(ModelConfig)} - set(CHOSEN) - set(FROM_DATA)
        for key in overrides:
            if key in CHOSEN:
                raise ValueError(f"'{key}' is a key of train.model itself, not an override")
            if key in FROM_DATA:
                raise ValueError(f"'{key}' follows the prepared data (the prepare section), not an override")
            if key not in known:
                raise ValueError(f"unknown model field '{key}' (allowed: {', '.join(sorted(known))})")
        return overrides


class Losses(section_from_dataclass(LossWeights, "LossesBase", "Task weights of the multi-task objective")):
    def weights(self) -> LossWeights:
        return LossWeights(**self.model_dump())


class FaultDrill(Strict):
    """Kill `rank` when it reaches `step` (once per training run: not again after recovery)."""

    rank: int | None = Field(None, ge=0)
    step: int | None = Field(None, ge=1)


class LoopConfig(Strict):
    """What the training loop reads: the train stage's section without its model choice. The
    distill and prune stages train through the same loop with sections built on this one."""

    losses: Losses = Losses()
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    placement: Literal["PACK", "SPREAD"] = Field(
        "PACK",
        description="how Ray places the workers: PACK on as few nodes as fit (least traffic), SPREAD over "
        "the nodes (a lost node takes fewer workers); a restart after a lost node uses the nodes left",
    )
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["auto", "bf16", "bf16-mixed", "fp16", "fp32"] = Field(
        "bf16",
        description="bf16: bf16 weights (fp32 master copy in the optimizer); bf16-mixed: fp32 weights, bf16 autocast; "
        "auto: bf16 where the training machine computes it faster than fp32 (a GPU, a CPU with native bf16), else fp32",
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
        description="data epochs per pass of the Ray Data stream: the pipeline drains and refills between "
        "passes (seconds on a small machine), not between these epochs",
    )
    seed: int = Field(0, ge=0)
    deterministic: bool = Field(
        True,
        description="the train stream keeps one order (Ray Data's preserve_order): a repeated run, or one resumed "
        "after a worker died, trains on the same batches and ends with the same weights; false: blocks are used "
        "in the order they finish, a little faster, and two runs with the same seed differ",
    )
    fault: FaultDrill = FaultDrill()
    deepspeed: dict = Field(
        default_factory=dict,
        description="laid over the generated DeepSpeed config, e.g. {zero_optimization: {reduce_bucket_size: 5e8}}",
    )

    def loop(self) -> LoopConfig:
        """The loop's own fields of this section (a subclass adds its stage's keys)."""
        return LoopConfig(**{key: getattr(self, key) for key in LoopConfig.model_fields})


class LoraChoice(Strict):
    """LoRA adapters (`model.lora`, through peft) on the layers `targets` names: only they (and
    the heads, with `train_heads`) train, every other weight stays as it starts. The saved model
    has the adapters merged into its weights: a plain model folder."""

    rank: int | None = Field(None, ge=1, description="the adapters' rank; null: full fine-tune (every weight trains)")
    alpha: int = Field(16, ge=1, description="the adapters' update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    targets: str = Field(
        LORA_TARGETS,
        min_length=1,
        description="regular expression matched in full against module names (peft's target_modules); "
        "the default: attention and MLP layers of the fusion encoder and the decoder",
    )
    train_heads: bool = Field(False, description="also train the matching and answer heads (fully)")

    @field_validator("targets")
    @classmethod
    def _regex(cls, targets: str) -> str:
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(f"not a regular expression ({err})") from None
        return targets

    def adapters(self) -> dict | None:
        """add_lora's keyword arguments, or None for a full fine-tune."""
        return None if self.rank is None else self.model_dump()


class TrainConfig(LoopConfig):
    model: ModelChoice = ModelChoice()
    init_from: str | None = Field(
        None,
        description=f"the model to start from: null (random weights), or {FORMS}. An alias is resolved when the "
        "run is planned (the stage's identity follows the version it names); a registered INT8 version starts "
        "from the float model its crossmodal.trained_model tag names. Its weights must fit train.model at the "
        "prepared sizes; prepare.vocabulary_from follows it, so the data is tokenized with the model's own tokenizer",
    )
    lora: LoraChoice = Field(
        LoraChoice(), description="LoRA adapters instead of a full fine-tune (rank: null = full fine-tune)"
    )

    @field_validator("init_from")
    @classmethod
    def _reference(cls, ref: str | None) -> str | None:
        return model_reference(ref)


def chosen_model(
    cfg: TrainConfig,
    *,
    vocab_size: int,
    num_answers: int,
    max_text_len: int,
    image_size: int,
    sample_rate: int,
    audio_seconds: float,
) -> ModelConfig:
    """The model `train.model` chooses, at the sizes the data fits. Raises ValueError when the
    two do not fit together (an image size the patch size does not divide, say)."""
    return registered_size(
        cfg.model.size,
        vocab_size=vocab_size,
        num_answers=max(1, num_answers),
        max_text_len=max_text_len,
        image_size=image_size,
        sample_rate=sample_rate,
        audio_seconds=audio_seconds,
        fusion=cfg.model.fusion,
        image_encoder=cfg.model.image_encoder,
        modality_dropout=cfg.model.modality_dropout,
        **cfg.model.overrides,
    )


def model_config_for(cfg: TrainConfig, spec, tokenizer) -> ModelConfig:
    """The model the prepared data fits: vocabulary, answers, image size and audio length come
    from prepare (its dataset spec and tokenizer)."""
    decode = spec.settings
    return chosen_model(
        cfg,
        vocab_size=tokenizer.vocab_size,
        num_answers=len(spec.answers),
        max_text_len=spec.max_text_len,
        image_size=decode.image_size,
        sample_rate=decode.sample_rate,
        audio_seconds=decode.max_audio_seconds,
    )
