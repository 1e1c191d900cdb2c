"""Validation and test metrics: retrieval recall@K in every direction, VQA accuracy, caption loss.

`collect` runs the model over batches (each rank over its part, when distributed) and keeps
the small per-sample results; `gather` brings every rank's part together; `summarize` turns
them into metrics. Retrieval: the queries are the samples that have both modalities, the
candidates every sample that has the target modality, the answer the query's own sample.
"""

from __future__ import annotations

import itertools
from typing import Iterable

import torch
import torch.nn.functional as F

from model.config import MODALITIES
from model.objectives import generation

KS = (1, 5, 10)


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
    return {name: torch.cat([part[name] for part in everything if name in part])
            for name in set().union(*(part.keys() for part in everything))}


def retrieval(queries: torch.Tensor, candidates: torch.Tensor, has_query: torch.Tensor, has_candidate: torch.Tensor) -> dict:
    """recall@K and mean rank of each query's own sample among all candidates."""
    candidate_rows = has_candidate.nonzero().squeeze(1)
    query_rows = (has_query & has_candidate).nonzero().squeeze(1)
    if len(query_rows) == 0 or len(candidate_rows) < 2:
        return {}
    sims = F.normalize(queries[query_rows], dim=-1) @ F.normalize(candidates[candidate_rows], dim=-1).T
    position = torch.searchsorted(candidate_rows, query_rows)  # each query's own column
    own = sims.gather(1, position[:, None])
    rank = (sims > own).sum(dim=1)  # 0 = first
    out = {f"r{k}": float((rank < k).float().mean()) for k in KS}
    out |= {"mean_rank": float(rank.float().mean() + 1), "candidates": len(candidate_rows), "queries": len(query_rows)}
    return out


def summarize(results: dict[str, torch.Tensor]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    present = [m for m in MODALITIES if f"{m}_embedding" in results]
    for source, target in itertools.permutations(present, 2):
        scores = retrieval(results[f"{source}_embedding"], results[f"{target}_embedding"],
                           results[f"has_{source}"], results[f"has_{target}"])
        metrics |= {f"{source}_to_{target}.{name}": value for name, value in scores.items()}
    if "vqa_asked" in results and results["vqa_asked"].any():
        asked = results["vqa_asked"]
        metrics["vqa_accuracy"] = float(results["vqa_correct"][asked].float().mean())
        metrics["vqa_questions"] = int(asked.sum())
    if "caption_valid" in results and results["caption_valid"].any():
        metrics["caption_loss"] = float(results["caption_loss"][results["caption_valid"]].mean())
    metrics["samples"] = int(results["sample_id"].numel())
    return metrics
