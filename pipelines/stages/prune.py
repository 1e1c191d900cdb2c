"""Prune: structured pruning that removes computation (F14): whole attention heads, MLP hidden
channels and the conv tower's channels, the lowest by an importance score from a calibration
pass over train batches (`model.prune`), then a short recovery fine-tune through the training
loop. The pruned model has smaller matrices, is described by its config and loads with
`model.io.load`. Its input is `prune.source`: the distilled student or the trained model."""

from __future__ import annotations

import json

from model.io import SavedModel
from model.objectives import MultiTaskObjective
from model.prune import importance, report
from model.prune import prune as prune_model
from pipelines.config.compress import PruneConfig
from pipelines.dag import StageContext, StageResult
from pipelines.stages.compressed import (
    describe,
    figures_of,
    input_figures,
    load_uri,
    model_result,
    train_batches,
)
from pipelines.stages.models import check_micro_batch, prepared_spec, store_model
from pipelines.training.ray_fit import fit


def prune(cfg: PruneConfig, ctx: StageContext) -> StageResult:
    spec = prepared_spec(ctx)
    check_micro_batch(cfg, spec, "prune")
    source = ctx.inputs[cfg.source]
    saved = load_uri(source.outputs["model"])
    calibration = train_batches(spec, cfg.calibration_batches, cfg.micro_batch) if cfg.importance == "taylor" else []
    scores = importance(saved.model.train(), cfg.importance, calibration, MultiTaskObjective(cfg.losses.weights()))
    pruned = prune_model(saved.model, cfg.heads, cfg.mlp, cfg.conv, scores).eval()
    shrunk = report(saved.model, pruned)
    print(f"prune: {shrunk['parameters'][0]:,} -> {shrunk['parameters'][1]:,} parameters; {json.dumps(shrunk)}")
    extra = {"run_id": ctx.run_id, "pruned_from": source.outputs["model"]}
    start_uri = store_model(SavedModel(pruned, saved.tokenizer, saved.answers, extra), ctx.output.child("pruned"))
    steps = 0
    if cfg.max_steps:  # recovery: the pruned weights fine-tuned through the training loop
        fitted = fit(cfg, pruned.cfg, spec, ctx, init=start_uri)
        pruned.load_state_dict(fitted.state)
        steps = fitted.steps
    model_uri = store_model(SavedModel(pruned.eval(), saved.tokenizer, saved.answers, extra), ctx.output.child("model"))
    figures = input_figures(cfg.source, source, spec, cfg)
    figures["pruned"] = figures_of(model_uri, spec, cfg)
    print(describe("prune", figures))
    result = model_result(model_uri, figures, "pruned", {"recovery_steps": steps})
    result.summary["pruning"] = shrunk
    return result
