"""Train: DeepSpeed ZeRO workers on Ray Train over the prepared stream, fault tolerant
(`pipelines.training.ray_fit`), one MLflow run (rank 0 logs into this stage's run by id).

It starts from random weights, or from the model `train.init_from` names (pinned by the runner,
its vocabulary already the prepared data's: `prepare.vocabulary_from`), and trains every weight
or, with `train.lora.rank`, LoRA adapters only. At the end the ZeRO shards are consolidated
into one fp32 state dict (adapters merged into the weights) and saved in the model library's
format (safetensors + config + tokenizer). The test split is the evaluate stage's: one scoring
path for every model (validation during training uses the same code).
"""

from __future__ import annotations

import torch

from model.io import SavedModel, load
from model.lora import add_lora, load_adapters, merge_lora, parameter_summary
from model.multimodal import CrossModalModel
from model.tokenizer import Tokenizer
from pipelines.config.train import TrainConfig, model_config_for
from pipelines.dag import StageContext, StageError, StageResult
from pipelines.data.dataset import DatasetSpec
from pipelines.data.profile import Finding, train_findings
from pipelines.errors import UserError
from pipelines.stages.models import check_micro_batch, model_artifacts, prepared_spec, store_model
from pipelines.training.init_from import check_fits, check_vocabulary, float_folder
from pipelines.training.ray_fit import fit


def train(cfg: TrainConfig, ctx: StageContext) -> StageResult:
    spec = prepared_spec(ctx)
    findings = train_findings(cfg.losses, spec.profile) if spec.profile else []
    if cfg.lora.rank is not None and not cfg.init_from:
        findings.append(Finding("train.lora.rank", "LoRA without train.init_from: adapters on frozen random weights"))
    for finding in findings:  # before minutes of training: tasks the data cannot train
        print(f"train: warning: {finding}")
    if "val" not in spec.shards:
        print("train: no val split in the prepared data: no validation")
    check_micro_batch(cfg, spec, "train")
    tokenizer = Tokenizer.from_json(spec.tokenizer_json)
    model_cfg = model_config_for(cfg, spec, tokenizer)
    start, start_uri = starting_model(cfg, spec, model_cfg, ctx) if cfg.init_from else (None, None)
    counts = trained_parameters(cfg, model_cfg)
    print(
        f"train: model {cfg.model.size} ({counts['total']:,} parameters, {counts['trainable']:,} trained), "
        f"from {cfg.init_from or 'random weights'}, {cfg.workers} workers, ZeRO-{cfg.zero_stage} {cfg.precision}"
    )
    fitted = fit(cfg, model_cfg, spec, ctx, init=start_uri, lora=cfg.lora.adapters())
    model = trained_model(cfg, model_cfg, fitted.state, start)
    extra = {"run_id": ctx.run_id, "checkpoint": fitted.checkpoint, "init_from": cfg.init_from}
    model_uri = store_model(SavedModel(model, tokenizer, spec.answers, extra), ctx.output.child("model"))
    steps = fitted.steps
    print(f"train: {steps} steps; model saved to {model_uri}")
    return StageResult(
        outputs={"model": model_uri, "checkpoint": fitted.checkpoint},
        metrics={"steps": steps, "warnings": len(findings)},
        summary={"steps": steps, "warnings": [str(f) for f in findings]},
        tables={"warnings": [f.as_row() for f in findings]},
        artifacts=model_artifacts(model_uri),
    )


def starting_model(cfg: TrainConfig, spec: DatasetSpec, model_cfg, ctx: StageContext) -> tuple[SavedModel, str]:
    """The float model `train.init_from` names, checked against train.model and the prepared
    vocabulary, and a copy of it under this stage's output that the workers of any node read."""
    where = f"train.init_from {cfg.init_from}"
    try:
        folder = float_folder(cfg.init_from, ctx.tracking_uri)
    except UserError as err:
        raise StageError(f"train.init_from {err}") from None
    saved = load(folder)
    check_fits(saved.model.state_dict(), CrossModalModel(model_cfg).state_dict(), where)
    check_vocabulary(saved, spec, where)
    return saved, ctx.output.child("init").upload(folder)


def trained_parameters(cfg: TrainConfig, model_cfg) -> dict[str, int]:
    """Trainable and total parameters of what the workers train; wrapping a fresh model checks
    that `train.lora.targets` names layers LoRA can adapt, before the workers start."""
    model = CrossModalModel(model_cfg)
    if cfg.lora.rank is None:
        return parameter_summary(model)
    try:
        return parameter_summary(add_lora(model, **cfg.lora.adapters()))
    except ValueError as err:  # peft: no layer matched, or one it cannot adapt
        raise StageError(f"train.lora.targets {cfg.lora.targets}: {str(err).splitlines()[0]}") from None


def trained_model(cfg: TrainConfig, model_cfg, state: dict[str, torch.Tensor], start: SavedModel | None):
    """The model to save. Under LoRA: the starting weights with the trained adapters (and heads)
    of `state` merged in; every other weight is the starting model's bit for bit (the
    checkpoint's copy of a frozen weight is in the training precision, bf16 perhaps)."""
    if cfg.lora.rank is None:
        model = CrossModalModel(model_cfg)
        model.load_state_dict(state)
        return model.eval()
    if start is None:
        torch.manual_seed(cfg.seed)  # the random weights the workers started from (ray_worker)
    wrapped = add_lora(start.model if start else CrossModalModel(model_cfg), **cfg.lora.adapters())
    load_adapters(wrapped, state)
    return merge_lora(wrapped).eval()
