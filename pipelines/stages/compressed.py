"""What the compression stages share: where their models are, how each is scored (the
evaluate stage's code, same split and samples) and measured (parameters, size on disk, CPU
latency at batch 1 and 32, peak memory), and the result they hand on: every model's figures,
so the register stage can lay teacher, student, pruned and quantized side by side."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from model.io import SavedModel
from pipelines.compression import measure
from pipelines.compression.folder import load_any
from pipelines.config.evaluate import EvaluateConfig
from pipelines.dag import StageContext, StageResult
from pipelines.data.collate import to_model_batch
from pipelines.data.dataset import DatasetSpec, build_dataset
from pipelines.inference.resolve import load_model
from pipelines.stages.evaluate import score
from pipelines.stages.models import model_artifacts
from pipelines.storage import Storage

# The figures a compression report shows, in its column order.
COST = ("parameters", "size_mb", "latency_b1_ms", "latency_b32_ms", "peak_memory_mb", "threads")
RECALL = "retrieval.text_to_image.r1"


def stage_model(ref: str, ctx: StageContext, name: str) -> str:
    """A storage URI of the model folder `ref` names: another stage's output as it is; an MLflow
    reference or a folder outside the storage root copied below this stage's output, so the
    Ray workers of any node can read it."""
    if "://" in ref and not ref.startswith(("runs:/", "models:/")):
        return ref
    saved_folder = load_model(ref, ctx.tracking_uri)[1]
    return ctx.output.child(name).upload(saved_folder)


def local_folder(uri: str) -> Path:
    return Storage(uri).local_copy()


def load_uri(uri: str) -> SavedModel:
    return load_any(local_folder(uri))


def train_batches(spec: DatasetSpec, count: int, batch_size: int) -> list[dict]:
    """`count` model batches of the train split as training sees them (calibration data)."""
    rows = build_dataset(spec, "train").iter_torch_batches(batch_size=batch_size, drop_last=True)
    with torch.no_grad():
        return [to_model_batch(raw) for raw in itertools.islice(rows, count)]


def scoring_config(section) -> EvaluateConfig:
    return EvaluateConfig(split=section.split or "test", max_samples=section.max_samples)


def figures_of(uri: str, spec: DatasetSpec, section, scored: bool = True) -> dict[str, float]:
    """A model's cost figures and (when `scored`) its task metrics on the evaluate split."""
    folder = local_folder(uri)
    batches = test_batches(spec, section)
    cost = measure.measure(folder, batches, threads=section.measure.threads, repeats=section.measure.repeats)
    figures = {
        "parameters": cost.parameters,
        "size_mb": cost.size_bytes / 1e6,
        "latency_b1_ms": cost.latency_b1_ms,
        "latency_b32_ms": cost.latency_b32_ms,
        "peak_memory_mb": cost.peak_memory_mb,
        "threads": cost.threads,
    }
    if scored:
        metrics, _ = score(load_any(folder), spec, scoring_config(section))
        figures |= metrics
    return figures


def test_batches(spec: DatasetSpec, section, size: int = 32) -> list[dict]:
    """Real batches of the evaluate split for the latency figures (the serving path)."""
    rows = build_dataset(spec, section.split or "test").iter_torch_batches(batch_size=size)
    with torch.no_grad():
        return [to_model_batch(raw) for raw in itertools.islice(rows, 2)]


def describe(stage: str, figures: dict[str, dict]) -> str:
    """A few printed lines: each model's cost and recall."""
    lines = []
    for name, values in figures.items():
        recall = f", t2i R@1 {values[RECALL]:.3f}" if RECALL in values else ""
        lines.append(
            f"{stage}: {name}: {values['parameters']:,.0f} parameters, {values['size_mb']:.1f} MB, "
            f"{values['latency_b32_ms']:.1f} ms at batch 32 ({values['latency_b1_ms']:.1f} at 1, "
            f"{values.get('threads', 0):.0f} threads), peak {values['peak_memory_mb']:.0f} MB{recall}"
        )
    return "\n".join(lines)


def model_result(uri: str, figures: dict[str, dict], main: str, extra: dict | None = None) -> StageResult:
    """The stage's model and its figures: metrics `<model>.<figure>`, plus the main model's
    task metrics unprefixed (as the evaluate stage logs them); `figures` in the summary."""
    metrics = {f"{name}.{k}": float(v) for name, values in figures.items() for k, v in values.items()}
    metrics |= {k: float(v) for k, v in figures[main].items() if k not in COST}
    metrics |= extra or {}
    rows = [{"model": name, **{k: values.get(k) for k in (*COST, RECALL)}} for name, values in figures.items()]
    return StageResult(
        outputs={"model": uri},
        metrics=metrics,
        summary={"figures": figures, **(extra or {})},
        tables={"figures": rows},
        artifacts=model_artifacts(uri),
    )


def logged_metric(ctx: StageContext, key: str) -> float | None:
    """A metric the stage's workers logged to its MLflow run (None if they did not)."""
    from mlflow import MlflowClient

    return MlflowClient(ctx.tracking_uri).get_run(ctx.run_id).data.metrics.get(key)


def input_name(stage: str) -> str:
    """What a compression report calls the model a stage produced."""
    return {"train": "teacher", "distill": "student", "prune": "pruned"}.get(stage, stage)


def input_figures(stage: str, result: StageResult, spec: DatasetSpec, section, scored: bool = False) -> dict:
    """The figures the input stage handed on (teacher, student, ...), with its own model's
    measured here when it has none (the trained model: its scores are the evaluate stage's,
    unless `scored`)."""
    figures = {name: dict(values) for name, values in result.summary.get("figures", {}).items()}
    name = input_name(stage)
    if name not in figures or (scored and RECALL not in figures[name]):
        figures[name] = figures_of(result.outputs["model"], spec, section, scored=scored)
    return figures
