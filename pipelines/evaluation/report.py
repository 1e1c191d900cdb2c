"""Collected results -> the evaluate stage's metrics and its table of examples.

Metric names (MLflow keys):
    retrieval.<source>_to_<target>.{r1,r5,r10,mean_rank,candidates,queries}
    caption.<context>.{bleu4,cider,samples}        context: image, audio, image_audio
    vqa.<context>.{exact,soft,questions}
    robustness.caption.without_<m>.{bleu4,cider}    drop when modality m is removed (positive = worse)
    robustness.vqa.without_<m>.exact
    safety.{captions,answers}.{checked,blocked}
Robustness compares, on the samples that have both image and audio, the full context with
each modality removed. Retrieval has no robustness figure: each direction already uses one
modality per side, so removing another changes nothing.
"""

from __future__ import annotations

import numpy as np

from pipelines.evaluation.collect import CONTEXTS, Collected, modality_flags
from pipelines.evaluation.metrics import all_directions, bleu4, cider, recall_summary, vqa_exact, vqa_soft


def caption_rows(collected: Collected, context: str, only: np.ndarray | None = None) -> np.ndarray:
    flags = modality_flags(collected)
    rows = flags["text"] & np.any([flags[m] for m in CONTEXTS[context]], axis=0)
    return np.flatnonzero(rows if only is None else rows & only)


def question_rows(collected: Collected, context: str, only: np.ndarray | None = None) -> np.ndarray:
    flags = modality_flags(collected)
    asked = np.array([bool(a) for a in collected.answers])
    rows = asked & np.any([flags[m] for m in CONTEXTS[context]], axis=0)
    return np.flatnonzero(rows if only is None else rows & only)


def caption_scores(collected: Collected, context: str, rows: np.ndarray) -> dict[str, float]:
    hypotheses = [collected.captions[context][i] for i in rows]
    references = [[collected.references[i]] for i in rows]
    return {"bleu4": bleu4(hypotheses, references), "cider": cider(hypotheses, references), "samples": len(rows)}


def vqa_scores(collected: Collected, context: str, rows: np.ndarray) -> dict[str, float]:
    predicted = [collected.predicted[context][i] for i in rows]
    references = [[collected.answers[i]] for i in rows]
    if not len(rows):
        return {"questions": 0}
    return {
        "exact": float(np.mean([vqa_exact(p, r) for p, r in zip(predicted, references)])),
        "soft": float(np.mean([vqa_soft(p, r) for p, r in zip(predicted, references)])),
        "questions": len(rows),
    }


def evaluation_metrics(collected: Collected) -> dict[str, float]:
    metrics: dict[str, float] = {}
    embeddings, present = collected.stacked()
    for direction, (ranks, candidates) in all_directions(embeddings, present).items():
        metrics |= {f"retrieval.{direction}.{k}": v for k, v in recall_summary(ranks, candidates).items()}
    for context in CONTEXTS:
        metrics |= prefixed(f"caption.{context}", caption_scores(collected, context, caption_rows(collected, context)))
        metrics |= prefixed(f"vqa.{context}", vqa_scores(collected, context, question_rows(collected, context)))
    flags = modality_flags(collected)
    both = flags["image"] & flags["audio"]
    full_caption = caption_scores(collected, "image_audio", caption_rows(collected, "image_audio", both))
    full_vqa = vqa_scores(collected, "image_audio", question_rows(collected, "image_audio", both))
    for removed, kept in (("image", "audio"), ("audio", "image")):
        alone = caption_scores(collected, kept, caption_rows(collected, kept, both))
        metrics |= {f"robustness.caption.without_{removed}.{k}": full_caption[k] - alone[k] for k in ("bleu4", "cider")}
        if full_vqa["questions"]:
            alone_vqa = vqa_scores(collected, kept, question_rows(collected, kept, both))
            metrics[f"robustness.vqa.without_{removed}.exact"] = full_vqa["exact"] - alone_vqa["exact"]
    for kind, (checked, blocked) in collected.filter_counts.items():
        metrics[f"safety.{kind}.checked"], metrics[f"safety.{kind}.blocked"] = checked, blocked
    metrics["samples"] = len(collected.references)
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
                **{f"caption_from_{c}": collected.captions[c][i] for c in CONTEXTS},
                "question": collected.questions[i],
                "reference_answer": collected.answers[i],
                **{f"answer_from_{c}": collected.predicted[c][i] for c in CONTEXTS},
            }
        )
    return rows
