"""Collected results -> metrics (the evaluate stage's and validation's) and the table of examples.

Metric names (MLflow keys):
    retrieval.<source>_to_<target>.{r1,r5,r10,mean_rank,candidates,queries,hub_share,hub_paired}
    caption.loss                                    teacher-forced, from every context modality
    caption.<context>.{bleu4,cider,samples}        context: image, audio, image_audio
    vqa.<context>.{exact,soft,questions}
    robustness.caption.without_<m>.{bleu4,cider}    drop when modality m is removed (positive = worse)
    robustness.vqa.without_<m>.exact
    safety.{captions,answers}.{checked,blocked}
    vqa.<context>.by_type.<type>, retrieval.<dir>.wrong_top1...: pipelines/evaluation/diagnosis.py
Robustness compares, on the samples that have both image and audio, the full context with
each modality removed. Retrieval has no robustness figure: each direction already uses one
modality per side, so removing another changes nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.evaluation.collect import CONTEXTS, FULL, Collected, modality_flags
from pipelines.evaluation.diagnosis import diagnosis_metrics
from pipelines.evaluation.metrics import all_directions, bleu4, cider, recall_summary, top1_hub, vqa_exact, vqa_soft


def caption_rows(collected: Collected, context: str, only: np.ndarray | None = None) -> np.ndarray:
    flags = modality_flags(collected)
    rows = flags["text"] & np.any([flags[m] for m in CONTEXTS[context]], axis=0)
    return np.flatnonzero(rows if only is None else rows & only)


def question_rows(collected: Collected, context: str, only: np.ndarray | None = None) -> np.ndarray:
    flags = modality_flags(collected)
    asked = np.array(collected.answer_labels) >= 0
    rows = asked & np.any([flags[m] for m in CONTEXTS[context]], axis=0)
    return np.flatnonzero(rows if only is None else rows & only)


def caption_scores(collected: Collected, context: str, rows: np.ndarray) -> dict[str, float]:
    hypotheses = [collected.captions[context][i] for i in rows]
    references = [[collected.references[i]] for i in rows]
    return {"bleu4": bleu4(hypotheses, references), "cider": cider(hypotheses, references), "samples": len(rows)}


def vqa_scores(collected: Collected, context: str, rows: np.ndarray) -> dict[str, float]:
    """Exact match (and the VQA soft score) on the answer strings where the evaluation has them,
    on the answer classes otherwise (validation: the same answer vocabulary on both sides)."""
    if not len(rows):
        return {"questions": 0}
    if collected.predicted.get(context):
        predicted = [collected.predicted[context][i] for i in rows]
        references = [[collected.answers[i]] for i in rows]
        return {
            "exact": float(np.mean([vqa_exact(p, r) for p, r in zip(predicted, references)])),
            "soft": float(np.mean([vqa_soft(p, r) for p, r in zip(predicted, references)])),
            "questions": len(rows),
        }
    predicted, labels = np.array(collected.predicted_labels[context]), np.array(collected.answer_labels)
    return {"exact": float(np.mean(predicted[rows] == labels[rows])), "questions": len(rows)}


def evaluation_metrics(collected: Collected) -> dict[str, float]:
    """Every figure the collected parts allow (see the module docstring for the names)."""
    metrics: dict[str, float] = {}
    embeddings, present = collected.stacked()
    directions = all_directions(embeddings, present)
    for direction, (ranks, candidates) in directions.items():
        metrics |= {f"retrieval.{direction}.{k}": v for k, v in recall_summary(ranks, candidates).items()}
        source, target = direction.split("_to_")
        share, hub = top1_hub(embeddings[source], embeddings[target], present[source], present[target])
        # Whether the most-retrieved candidate has the query's modality: one that lacks it was
        # never contrasted against that modality in training (see docs/evaluation.md, hubness).
        metrics[f"retrieval.{direction}.hub_share"] = share
        metrics[f"retrieval.{direction}.hub_paired"] = float(present[source][hub])
    valid = torch.cat(collected.caption_valid) if collected.caption_valid else torch.zeros(0, dtype=torch.bool)
    if valid.any():
        metrics["caption.loss"] = float(torch.cat(collected.caption_loss)[valid].mean())
    for context in collected.captions:  # a context the split has no sample for is left out
        if len(rows := caption_rows(collected, context)):
            metrics |= prefixed(f"caption.{context}", caption_scores(collected, context, rows))
    for context in collected.predicted_labels:
        if len(rows := question_rows(collected, context)):
            metrics |= prefixed(f"vqa.{context}", vqa_scores(collected, context, rows))
    metrics |= diagnosis_metrics(collected, embeddings, present, directions)
    metrics |= robustness(collected)
    if collected.captions or collected.predicted:
        for kind, (checked, blocked) in collected.filter_counts.items():
            metrics[f"safety.{kind}.checked"], metrics[f"safety.{kind}.blocked"] = checked, blocked
    metrics["samples"] = len(collected)
    return metrics


def robustness(collected: Collected) -> dict[str, float]:
    """The drop when one context modality is removed, on the samples that have both."""
    metrics: dict[str, float] = {}
    flags = modality_flags(collected)
    both = flags["image"] & flags["audio"]
    for removed, kept in (("image", "audio"), ("audio", "image")):
        if FULL in collected.captions and kept in collected.captions and len(caption_rows(collected, kept, both)):
            full = caption_scores(collected, FULL, caption_rows(collected, FULL, both))
            alone = caption_scores(collected, kept, caption_rows(collected, kept, both))
            metrics |= {f"robustness.caption.without_{removed}.{k}": full[k] - alone[k] for k in ("bleu4", "cider")}
        if FULL in collected.predicted_labels and kept in collected.predicted_labels:
            full_vqa = vqa_scores(collected, FULL, question_rows(collected, FULL, both))
            if full_vqa["questions"]:
                alone_vqa = vqa_scores(collected, kept, question_rows(collected, kept, both))
                metrics[f"robustness.vqa.without_{removed}.exact"] = full_vqa["exact"] - alone_vqa["exact"]
    return metrics


def prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}.{k}": v for k, v in values.items()}


def example_table(collected: Collected, limit: int = 200) -> list[dict]:
    """Generated captions and answers next to their references, one row per sample."""
    rows = []
    flags = modality_flags(collected)
    for i in range(min(limit, len(collected.references))):
        rows.append(
            {
                "sample": i,
                "has": "+".join(m for m in ("image", "text", "audio") if flags[m][i]),
                "reference_caption": collected.references[i],
                **{f"caption_from_{c}": collected.captions[c][i] for c in collected.captions},
                "question": collected.questions[i],
                "reference_answer": collected.answers[i],
                **{f"answer_from_{c}": collected.predicted[c][i] for c in collected.predicted},
            }
        )
    return rows
