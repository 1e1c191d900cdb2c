"""Train: DeepSpeed ZeRO workers on Ray Train over the prepared stream, fault tolerant
(`pipelines.training.ray_fit`), one MLflow run (rank 0 logs into this stage's run by id).

At the end the ZeRO shards are consolidated into one fp32 state dict and saved in the model
library's format (safetensors + config + tokenizer). The test split is the evaluate stage's:
one scoring path for every model (validation during training uses the same code).
"""

from __future__ import annotations

from model.io import SavedModel
from model.multimodal import CrossModalModel, parameter_counts
from model.tokenizer import Tokenizer
from pipelines.config.train import TrainConfig, model_config_for
from pipelines.dag import StageContext, StageResult
from pipelines.data.profile import train_findings
from pipelines.stages.models import check_micro_batch, model_artifacts, prepared_spec, store_model
from pipelines.training.ray_fit import fit


def train(cfg: TrainConfig, ctx: StageContext) -> StageResult:
    spec = prepared_spec(ctx)
    findings = train_findings(cfg.losses, spec.profile) if spec.profile else []
    for finding in findings:  # before minutes of training: tasks the data cannot train
        print(f"train: warning: {finding}")
    if "val" not in spec.shards:
        print("train: no val split in the prepared data: no validation")
    check_micro_batch(cfg, spec, "train")
    tokenizer = Tokenizer.from_json(spec.tokenizer_json)
    model_cfg = model_config_for(cfg, spec, tokenizer)
    print(
        f"train: model {cfg.model.size} ({parameter_counts(CrossModalModel(model_cfg))['total']:,} parameters), "
        f"{cfg.workers} workers, ZeRO-{cfg.zero_stage} {cfg.precision}"
    )
    fitted = fit(cfg, model_cfg, spec, ctx)
    model = CrossModalModel(model_cfg)
    model.load_state_dict(fitted.state)
    model.eval()
    model_uri = store_model(
        SavedModel(model, tokenizer, spec.answers, {"run_id": ctx.run_id, "checkpoint": fitted.checkpoint}),
        ctx.output.child("model"),
    )
    steps = fitted.steps
    print(f"train: {steps} steps; model saved to {model_uri}")
    return StageResult(
        outputs={"model": model_uri, "checkpoint": fitted.checkpoint},
        metrics={"steps": steps, "warnings": len(findings)},
        summary={"steps": steps, "warnings": [str(f) for f in findings]},
        tables={"warnings": [f.as_row() for f in findings]},
        artifacts=model_artifacts(model_uri),
    )
