"""Why the figures are what they are: VQA accuracy per question type, and how each wrong top-1
retrieval result differs from its query. Logged on every evaluation that has the texts.

Metric names (MLflow keys):
    vqa.<context>.by_type.<type>            exact match on the questions of that type
    vqa.questions_by_type.<type>            how many questions of that type the split has
    retrieval.<dir>.wrong_top1              queries whose top-1 result is not their own sample
    retrieval.<dir>.wrong_top1_same_text    ... whose top-1 result has the query's caption, word
                                            for word (a twin: no model can tell them apart)
    retrieval.<dir>.confused.<attribute>    (the demo world) share of the wrong top-1 results whose
                                            scene differs from the query's in that attribute

Question types come from the question's wording (as VQA v2's question types do), so they work
on any data: count, colour, shape, position, yes_no, other. Attributes: `count` (a different
number of shapes); with the same number, `colour`, `kind` and `position` (the shapes in reading
order differ in that attribute; a swap of two shapes' colours counts as colour), and `none` (the
same scene: a twin). A wrong result usually differs in more than one, so the shares overlap.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import torch

from pipelines.data.demo_world import parse_caption
from pipelines.evaluation.metrics import direction_similarity, vqa_exact

QUESTION_TYPES = (  # first match wins
    ("count", re.compile(r"^(how many|how much|what number)\b")),
    ("colour", re.compile(r"\b(what|which) colou?rs?\b")),
    ("shape", re.compile(r"\b(what|which) (shape|kind|type)s?\b")),
    ("position", re.compile(r"^where\b|\b(what|which) (position|side|corner|cell)\b")),
    ("yes_no", re.compile(r"^(is|are|was|were|do|does|did|can|could|has|have|had|will|would|should)\b")),
)
ATTRIBUTES = ("count", "colour", "kind", "position", "none")


def diagnosis_metrics(collected, embeddings: dict, present: dict, directions) -> dict[str, float]:
    """Every figure above the collected texts allow (validation collects none: nothing)."""
    if not collected.references:
        return {}
    metrics: dict[str, float] = {}
    asked = np.flatnonzero(np.array(collected.answer_labels) >= 0)
    if collected.predicted and len(asked):
        metrics |= vqa_by_type(collected.questions, collected.answers, collected.predicted, asked)
    scenes = demo_scenes(collected.references)
    for direction in directions:
        source, target = direction.split("_to_")
        pairs = wrong_top1(embeddings[source], embeddings[target], present[source], present[target])
        metrics |= retrieval_confusions(direction, pairs, collected.references, scenes)
    return metrics


def question_type(question: str) -> str:
    text = " ".join(question.lower().split())
    return next((name for name, pattern in QUESTION_TYPES if pattern.search(text)), "other")


def vqa_by_type(questions: list[str], answers: list[str], predicted: dict[str, list[str]], rows) -> dict[str, float]:
    """Exact match per question type for every context, over `rows` (the samples asked)."""
    types = np.array([question_type(questions[i]) for i in rows])
    metrics: dict[str, float] = {f"vqa.questions_by_type.{t}": n for t, n in sorted(Counter(types).items())}
    for context, names in predicted.items():
        right = np.array([vqa_exact(names[i], [answers[i]]) for i in rows])
        for kind in sorted(set(types)):
            metrics[f"vqa.{context}.by_type.{kind}"] = float(right[types == kind].mean())
    return metrics


def wrong_top1(queries, candidates, has_query, has_candidate) -> tuple[np.ndarray, np.ndarray]:
    """(query sample, retrieved sample) for every query whose own sample is not the sole best:
    the retrieved one is the best-scoring other candidate (ties count against the query, as in
    `metrics.retrieval_ranks`)."""
    sims, query_rows, candidate_rows = direction_similarity(queries, candidates, has_query, has_candidate)
    if sims is None:
        return np.zeros(0, int), np.zeros(0, int)
    own = torch.searchsorted(candidate_rows, query_rows)
    own_score = sims.gather(1, own[:, None]).squeeze(1)
    sims.scatter_(1, own[:, None], float("-inf"))
    best, top = sims.max(dim=1)
    wrong = best >= own_score
    return query_rows[wrong].numpy(), candidate_rows[top[wrong]].numpy()


def differences(query: tuple, retrieved: tuple) -> list[str]:
    """The attributes in which two parsed demo scenes differ (see the module docstring)."""
    if len(query) != len(retrieved):
        return ["count"]
    attributes = ("colour", "kind", "position")
    found = [name for i, name in enumerate(attributes) if [s[i] for s in query] != [s[i] for s in retrieved]]
    return found or ["none"]


def demo_scenes(references: list[str]) -> list | None:
    """Each sample's parsed demo scene (None where it has no caption), or None when some caption
    is not a demo caption: then the data is not the demo world and only plain counts are given."""
    scenes = [parse_caption(text) if text else None for text in references]
    demo = any(scenes) and all(scene or not text for scene, text in zip(scenes, references))
    return scenes if demo else None


def retrieval_confusions(direction: str, pairs: tuple[np.ndarray, np.ndarray], references: list[str], scenes) -> dict:
    queries, retrieved = pairs
    metrics = {f"retrieval.{direction}.wrong_top1": len(queries)}
    same = sum(bool(references[q]) and references[q] == references[r] for q, r in zip(queries, retrieved))
    metrics[f"retrieval.{direction}.wrong_top1_same_text"] = same
    known = [(scenes[q], scenes[r]) for q, r in zip(queries, retrieved) if scenes[q] and scenes[r]] if scenes else []
    if known:  # the demo world: which attributes the wrong results got wrong
        counts = Counter(name for a, b in known for name in differences(a, b))
        metrics |= {f"retrieval.{direction}.confused.{name}": counts[name] / len(known) for name in ATTRIBUTES}
    return metrics


def summary_line(metrics: dict, direction: str = "text_to_image") -> str | None:
    """'VQA by type (image_audio): count 1.00, colour 0.84, ...; wrong top-1 text_to_image: 52,
    differing in count 0.10, colour 0.21, ...': the evaluate stage prints it under its figures
    (VQA from the fullest context the split has)."""
    asked = [c for c in ("image_audio", "image", "audio") if any(k.startswith(f"vqa.{c}.by_type.") for k in metrics)]
    context = asked[0] if asked else ""
    by_type = {k.rsplit(".", 1)[1]: v for k, v in metrics.items() if k.startswith(f"vqa.{context}.by_type.")}
    parts = []
    if by_type:
        parts.append(f"VQA by type ({context}): " + ", ".join(f"{k} {v:.2f}" for k, v in by_type.items()))
    wrong = metrics.get(f"retrieval.{direction}.wrong_top1")
    if wrong is not None:
        confused = [(a, metrics.get(f"retrieval.{direction}.confused.{a}")) for a in ATTRIBUTES]
        detail = ", ".join(f"{a} {v:.2f}" for a, v in confused if v is not None)
        parts.append(f"wrong top-1 {direction}: {wrong}" + (f", differing in {detail}" if detail else ""))
    return "; ".join(parts) or None
