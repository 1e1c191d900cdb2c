"""Validation and test metrics: retrieval recall@K in every direction, VQA accuracy, caption loss.

`collect` runs the model over batches (each rank over its part, when distributed) and keeps
the small per-sample results; `gather` brings every rank's part together; `summarize` turns
them into metrics. Retrieval: the queries are the samples that have both modalities, the
candidates every sample that has the target modality, the answer the query's own sample.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from model.config import MODALITIES
from model.objectives import generation
from pipelines.evaluation.metrics import all_directions, recall_summary


@torch.no_grad()
def collect(model, batches: Iterable[dict], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}

    def keep(name, value):
        parts.setdefault(name, []).append(value.detach().float().cpu() if value.is_floating_point() else value.cpu())

    for batch in batches:
        batch = {k: v.to(dtype) if v.is_floating_point() and k != "weight" else v for k, v in batch.items()}
        encoded = model.encode(batch)
        for m, emb in model.embed(encoded).items():
            keep(f"{m}_embedding", emb)
        size = batch["weight"].shape[0]
        present = {m: model.present(batch, m, size, batch["weight"].device) for m in encoded}
        for m in MODALITIES:
            keep(f"has_{m}", present.get(m, torch.zeros(size, dtype=torch.bool)))
        keep("sample_id", batch["sample_id"])
        context = {m: e for m, e in encoded.items() if m != "text"}
        if context:
            fused = model.fuse(context, present)
            ids, mask = batch.get("caption_ids", batch["text_ids"]), batch.get("caption_mask", batch["text_mask"])
            keep("caption_loss", generation(model, fused, ids, mask))
            keep("caption_valid", present["text"] & torch.stack([present[m] for m in context]).any(dim=0))
            asked = batch["answer_label"] >= 0
            question = model.encode_text(batch["question_ids"], batch["question_mask"])
            qa = model.fuse(dict(context, text=question), dict(present, text=asked))
            keep("vqa_correct", model.answer_logits(qa).argmax(dim=-1) == batch["answer_label"])
            keep("vqa_asked", asked)
    return {name: torch.cat(values) for name, values in parts.items()}


def gather(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank's collected results, concatenated (identity when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, local)
    return {
        name: torch.cat([part[name] for part in everything if name in part])
        for name in set().union(*(part.keys() for part in everything))
    }


def summarize(results: dict[str, torch.Tensor]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    present = [m for m in MODALITIES if f"{m}_embedding" in results]
    embeddings = {m: results[f"{m}_embedding"] for m in present}
    for direction, (ranks, candidates) in all_directions(embeddings, {m: results[f"has_{m}"] for m in present}).items():
        metrics |= {f"{direction}.{name}": value for name, value in recall_summary(ranks, candidates).items()}
    if "vqa_asked" in results and results["vqa_asked"].any():
        asked = results["vqa_asked"]
        metrics["vqa_accuracy"] = float(results["vqa_correct"][asked].float().mean())
        metrics["vqa_questions"] = int(asked.sum())
    if "caption_valid" in results and results["caption_valid"].any():
        metrics["caption_loss"] = float(results["caption_loss"][results["caption_valid"]].mean())
    metrics["samples"] = int(results["sample_id"].numel())
    return metrics
