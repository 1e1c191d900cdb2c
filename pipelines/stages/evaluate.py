"""Evaluate: retrieval in every direction, captioning, VQA, missing-modality robustness and the
content filter's counts, on one split, as MLflow metrics, plots and a table of examples.

It scores the train stage's model by default, or any model `evaluate.model` names (a folder,
runs:/<id>/model, models:/<name>@<alias>), so compression stages compare teacher, student,
pruned and quantized models on the same split with the same code. Metric names are listed
in pipelines/evaluation/report.py.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from pipelines.config.evaluate import EvaluateConfig
from pipelines.dag import StageContext, StageError, StageResult
from pipelines.data.collate import to_model_batch
from pipelines.data.dataset import DatasetSpec, build_dataset, limit_data_cpus
from pipelines.data.profile import MODALITIES, skipped_parts
from pipelines.evaluation.collect import CONTEXTS, Scoring, collect
from pipelines.evaluation.diagnosis import summary_line
from pipelines.evaluation.plots import example_grid, recall_curves, similarity_heatmap
from pipelines.evaluation.report import evaluation_metrics, example_table
from pipelines.inference.resolve import load_model
from pipelines.inference.safety import SafetyFilter
from pipelines.stages.models import prepared_spec
from pipelines.storage import Storage

HEADLINE = (
    "retrieval.text_to_image.r1",
    "retrieval.image_to_text.r1",
    "retrieval.audio_to_text.r1",
    "caption.image.bleu4",
    "caption.image.cider",
    "caption.audio.cider",
    "vqa.image_audio.exact",
    "robustness.vqa.without_image.exact",
    "safety.captions.blocked",
)


def evaluate(cfg: EvaluateConfig, ctx: StageContext) -> StageResult:
    spec = prepared_spec(ctx)
    ref = cfg.model or ctx.inputs["train"].outputs["model"]
    saved = load_stage_model(ref, ctx.tracking_uri)
    metrics, collected = score(saved, spec, cfg, SafetyFilter(cfg.safety), keep_media=cfg.max_samples or 100_000)
    skipped = skipped_parts({m: int(collected.flag(m).sum()) for m in MODALITIES}, questions(collected), cfg.split)
    if not saved.answers and questions(collected):
        skipped.append("the model has no answer vocabulary (trained without questions): VQA skipped")
    for note in skipped:
        print(f"evaluate: {note}")
    print(
        f"evaluate: {ref} on {cfg.split} ({metrics['samples']} samples): "
        + ", ".join(f"{k} {metrics[k]:.3f}" for k in HEADLINE if k in metrics)
    )
    if why := summary_line(metrics):
        print(f"evaluate: {why}")
    artifacts = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        drawn = [
            similarity_heatmap(collected, folder / "similarity.png"),
            recall_curves(collected, folder / "recall_at_k.png"),
            example_grid(collected, folder / "examples.png", saved.model.cfg.sample_rate),
        ]
        plots = [path for path in drawn if path is not None]  # None: the split lacks what the plot shows
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        for path in [*plots, folder / "metrics.json"]:
            ctx.output.write_bytes(path.read_bytes(), path.name)
            artifacts[f"plots/{path.name}" if path.suffix == ".png" else path.name] = ctx.output.child(path.name).uri
    return StageResult(
        outputs={"metrics": artifacts["metrics.json"], "model": str(ref)},
        metrics=metrics,
        summary={**{k: metrics[k] for k in HEADLINE if k in metrics}, "skipped": skipped},
        tables={"examples": example_table(collected, cfg.table_rows), "skipped": [{"note": n} for n in skipped]},
        artifacts=artifacts,
    )


def score(saved, spec: DatasetSpec, cfg: EvaluateConfig, safety: SafetyFilter | None = None, keep_media: int = 0):
    """(metrics, collected) of one model on `cfg.split`: the one scoring path, which the
    compression stages use too (same split, samples and candidate sets)."""
    if cfg.split not in spec.shards:
        raise StageError(
            f"evaluate.split: no {cfg.split!r} split in the prepared data (splits: {', '.join(spec.shards)})"
        )
    limit_data_cpus(spec.data_cpus)
    scoring = Scoring(
        contexts=contexts_of(spec.profile),
        tokenizer=saved.tokenizer,
        answer_names=tuple(saved.answers),
        generate=True,
        safety=safety,
        beam_size=cfg.beam_size,
        max_tokens=cfg.max_caption_tokens,
        keep_media=keep_media,
    )
    collected = collect(saved.model, split_batches(spec, cfg.split, cfg.batch_size, cfg.max_samples), scoring)
    return evaluation_metrics(collected), collected


def contexts_of(profile: dict) -> tuple[str, ...]:
    """The generation contexts the data has every modality of: for images only, captions from
    the image (a 'full' image + audio context would score the same samples again)."""
    have = profile.get("modalities")
    if not have:
        return tuple(CONTEXTS)
    return tuple(name for name, modalities in CONTEXTS.items() if all(have.get(m) for m in modalities))


def questions(collected) -> int:
    return sum(1 for label in collected.answer_labels if label >= 0)


def load_stage_model(ref: str, tracking_uri: str):
    """A model folder in the storage root (any filesystem) or an MLflow reference, loaded on CPU."""
    if "://" in ref and not ref.startswith(("runs:/", "models:/")):
        ref = str(Storage(ref).local_copy())
    saved, _ = load_model(ref, tracking_uri)
    return saved


def split_batches(spec: DatasetSpec, split: str, batch_size: int, max_samples: int | None):
    seen = 0
    for raw in build_dataset(spec, split).iter_torch_batches(batch_size=batch_size):
        if max_samples is not None:
            if seen >= max_samples:
                return
            raw = {k: v[: max_samples - seen] for k, v in raw.items()}
        seen += len(raw["weight"])
        with torch.no_grad():
            yield to_model_batch(raw), raw
