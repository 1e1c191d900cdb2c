"""Register: the last compression stage's model as an MLflow pyfunc model (weights as
safetensors or ONNX files, never pickled), a new version of `registry.name` with the alias
`registry.alias` (`challenger`), tagged with the pipeline run, the config hash and the test
metrics; the compression report (table + plots/compression.png) goes to this stage's run."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from pipelines.compression import report
from pipelines.compression.registry import register_model
from pipelines.config.compress import RegisterConfig
from pipelines.dag import StageContext, StageResult
from pipelines.stages.compressed import COST, local_folder


def register(cfg: RegisterConfig, ctx: StageContext) -> StageResult:
    source = ctx.inputs[cfg.source]
    evaluated = ctx.inputs["evaluate"]
    figures = {name: dict(values) for name, values in source.summary.get("figures", {}).items()}
    # The teacher's task metrics are the evaluate stage's (same split, same code).
    figures.setdefault("teacher", {}).update({k: v for k, v in evaluated.metrics.items() if k not in COST})
    final = final_model(cfg.source, source)
    metrics = {k: v for k, v in figures.get(final, figures["teacher"]).items() if headline(k)}
    pipeline_run, config_hash = pipeline_tags(ctx)
    uri, version = register_model(
        local_folder(source.outputs["model"]),
        name=cfg.name,
        alias=cfg.alias,
        tags={
            "crossmodal.pipeline_run": pipeline_run,
            "crossmodal.config_hash": config_hash,
            "crossmodal.stage_run": ctx.run_id,
            "crossmodal.source_stage": cfg.source,
            # The float model the registered one was compressed from: what a warm start
            # (train.init_from=models:/...) fine-tunes, since an INT8 version cannot train.
            "crossmodal.trained_model": evaluated.outputs["model"],
        },
        metrics=metrics,
        tracking_uri=ctx.tracking_uri,
        run_id=ctx.run_id,
    )
    alias_uri = f"models:/{cfg.name}@{cfg.alias}"
    table = report.rows(figures)
    text = report.markdown(table)
    print(f"register: compression report\n{text}")
    print(f"register: {alias_uri} -> version {version} ({uri})")
    print(f"register: serve it with: {serve_command(alias_uri, ctx.tracking_uri)}")
    artifacts = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "compression.md").write_text(text + "\n")
        (folder / "figures.json").write_text(json.dumps(figures, indent=2))
        drawn = report.plot(table, folder / "compression.png")
        for path in [p for p in (drawn, folder / "compression.md", folder / "figures.json") if p is not None]:
            ctx.output.write_bytes(path.read_bytes(), path.name)
            name = f"plots/{path.name}" if path.suffix == ".png" else path.name
            artifacts[name] = ctx.output.child(path.name).uri
    return StageResult(
        outputs={"model": alias_uri, "version_uri": uri},
        metrics={"version": version} | {f"{k}": v for k, v in metrics.items()},
        summary={
            "model": alias_uri,
            "version": version,
            "final": final,
            "serve": serve_command(alias_uri, ctx.tracking_uri),
        },
        tables={"compression": table},
        artifacts=artifacts,
    )


def headline(metric: str) -> bool:
    """The figures a version is tagged with (recall@1 per direction, VQA accuracy): enough to
    compare versions at a glance in the registry; every figure is in the stage's run."""
    return (metric.startswith("retrieval.") and metric.endswith(".r1")) or (
        metric.startswith("vqa.") and metric.endswith(".exact")
    )


def final_model(stage: str, result) -> str:
    """Which entry of the figures is the registered model."""
    return {"quantize": result.summary.get("route", "quantized"), "prune": "pruned", "distill": "student"}.get(
        stage, "teacher"
    )


def pipeline_tags(ctx: StageContext) -> tuple[str, str]:
    """The pipeline (parent) run's id and config hash."""
    from mlflow import MlflowClient

    client = MlflowClient(ctx.tracking_uri)
    parent = client.get_run(ctx.run_id).data.tags.get("mlflow.parentRunId", "")
    config_hash = client.get_run(parent).data.tags.get("crossmodal.config_hash", "") if parent else ""
    return parent, config_hash


def serve_command(model_uri: str, tracking_uri: str) -> str:
    """The command that serves the registered model from this environment (the scoring server
    runs uvicorn from the environment's bin folder, which must be on PATH)."""
    bin_folder = Path(sys.executable).parent
    return (
        f"PATH={bin_folder}:$PATH MLFLOW_TRACKING_URI={tracking_uri} "
        f"mlflow models serve -m {model_uri} --env-manager local -h 127.0.0.1 -p 5002"  # 5001: make cluster-up's MLflow
    )
