"""One pass of a model over a split: what every metric and plot needs, per sample.

The one scoring path: the evaluate stage and the training loop's validation both collect here
and turn the result into metrics with `pipelines.evaluation.report`. Validation asks for the
cheap parts (embeddings, the teacher-forced caption loss, answer classes from the full
context); the evaluate stage adds generated captions, answers per context (the full context
and each context modality alone: missing-modality robustness) and the text a user would see
after the content filter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from model.config import MODALITIES
from model.objectives import generation
from pipelines.inference import predict
from pipelines.inference.safety import SafetyFilter

# name -> the context modalities generation and answers may use
CONTEXTS = {"image_audio": ("image", "audio"), "image": ("image",), "audio": ("audio",)}
FULL = "image_audio"


@dataclass
class Collected:
    embeddings: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    present: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    caption_loss: list[torch.Tensor] = field(default_factory=list)  # teacher-forced, full context
    caption_valid: list[torch.Tensor] = field(default_factory=list)  # has text and some context
    answer_labels: list[int] = field(default_factory=list)  # reference answer class (-1 = no question)
    predicted_labels: dict[str, list[int]] = field(default_factory=dict)  # context -> answer class
    # With a tokenizer (the evaluate stage): texts, for metrics on strings and the examples table.
    references: list[str] = field(default_factory=list)  # the clean caption ("" = none)
    questions: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # the reference answer ("" = no question)
    captions: dict[str, list[str]] = field(default_factory=dict)  # context -> generated caption, filtered
    predicted: dict[str, list[str]] = field(default_factory=dict)  # context -> predicted answer, filtered
    # kind ("captions"/"answers") -> [checked, blocked] by the content filter, over every context
    filter_counts: dict[str, list[int]] = field(default_factory=lambda: {"captions": [0, 0], "answers": [0, 0]})
    images: list[np.ndarray] = field(default_factory=list)  # uint8 HWC thumbnails of the first samples
    audio: list[np.ndarray] = field(default_factory=list)  # waveforms of the first samples

    def __len__(self) -> int:
        return len(self.answer_labels)

    def stacked(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return (
            {m: torch.cat(v) for m, v in self.embeddings.items()},
            {m: torch.cat(v) for m, v in self.present.items()},
        )

    def flag(self, modality: str) -> np.ndarray:
        return torch.cat(self.present[modality]).numpy() if modality in self.present else np.zeros(len(self), bool)


@dataclass(frozen=True)
class Scoring:
    """What to collect beyond embeddings and the caption loss."""

    contexts: tuple[str, ...] = (FULL,)  # answer classes (and captions) from these contexts
    tokenizer: object | None = None  # decode references, questions; needed to generate
    answer_names: tuple[str, ...] | None = None  # the answer vocabulary (None: classes only)
    generate: bool = False  # captions from every context (needs the tokenizer)
    safety: SafetyFilter | None = None  # generated text passes it (None: no filter)
    beam_size: int = 1
    max_tokens: int = 32
    keep_media: int = 0  # images and waveforms of the first samples, for the plots


@torch.no_grad()
def collect(model, batches: Iterable, scoring: Scoring = Scoring(), dtype: torch.dtype = torch.float32) -> Collected:
    """`batches` yields model batches, or (model batch, raw tensors) pairs whose raw uint8 images
    and waveforms feed the plots."""
    out = Collected()
    for item in batches:
        batch, raw = item if isinstance(item, tuple) else (item, None)
        batch = {k: v.to(dtype) if v.is_floating_point() and k != "weight" else v for k, v in batch.items()}
        encoded = model.encode(batch)  # once per batch: embeddings, caption loss and answers share it
        keep_embeddings(model, batch, encoded, out)
        keep_caption_loss(model, batch, encoded, out)
        asked = (batch["answer_label"] >= 0).tolist()
        out.answer_labels += batch["answer_label"].tolist()
        if scoring.tokenizer is not None:
            keep_texts(scoring.tokenizer, scoring.answer_names, batch, asked, out)
        for name in scoring.contexts:
            keep_answers(model, batch, encoded, name, asked, scoring, out)
            if scoring.generate:
                texts = captions_from(model, batch, name, scoring)
                out.captions.setdefault(name, []).extend(filtered(texts, scoring.safety, out.filter_counts["captions"]))
        room = scoring.keep_media - len(out.images)
        if raw is not None and room > 0:
            out.images += list(raw["image"][:room].numpy())
            out.audio += list(raw["audio"][:room].numpy())
    return out


def captions_from(model, batch: dict, context: str, scoring: Scoring) -> list[str]:
    """Generated captions from one context; nothing is generated for a batch without it."""
    if not any(batch[f"has_{m}"].any() for m in CONTEXTS[context] if f"has_{m}" in batch):
        return [""] * batch["weight"].shape[0]
    texts, _ = predict.captions(
        model, scoring.tokenizer, batch, CONTEXTS[context], scoring.beam_size, scoring.max_tokens
    )
    return texts


def keep_embeddings(model, batch: dict, encoded: dict, out: Collected) -> None:
    size = batch["weight"].shape[0]
    for m, e in model.embed(encoded).items():
        out.embeddings.setdefault(m, []).append(e.float().cpu())
        out.present.setdefault(m, []).append(model.present(batch, m, size, e.device).cpu())


def keep_caption_loss(model, batch: dict, encoded: dict, out: Collected) -> None:
    """Teacher-forced caption loss from the full context (what validation tracks)."""
    context, present, has_context = predict.context_inputs(model, batch, CONTEXTS[FULL], encoded)
    size = batch["weight"].shape[0]
    if not context or "text_ids" not in batch:
        out.caption_loss.append(torch.zeros(size))
        out.caption_valid.append(torch.zeros(size, dtype=torch.bool))
        return
    ids, mask = batch.get("caption_ids", batch.get("text_ids")), batch.get("caption_mask", batch.get("text_mask"))
    out.caption_loss.append(generation(model, model.fuse(context, present), ids, mask).float().cpu())
    out.caption_valid.append((model.present(batch, "text", size, ids.device) & has_context).cpu())


def keep_texts(tokenizer, answer_names, batch: dict, asked: list[bool], out: Collected) -> None:
    has_text = batch["has_text"].tolist()
    out.references += [tokenizer.decode(ids) if ok else "" for ids, ok in zip(batch["caption_ids"].tolist(), has_text)]
    out.questions += [tokenizer.decode(ids) if ok else "" for ids, ok in zip(batch["question_ids"].tolist(), asked)]
    names = answer_names or ()
    out.answers += [
        names[label] if ok and label < len(names) else "" for label, ok in zip(batch["answer_label"].tolist(), asked)
    ]


def keep_answers(
    model, batch: dict, encoded: dict, context: str, asked: list[bool], scoring: Scoring, out: Collected
) -> None:
    """The answer class per question from one context; nothing when the model has no answers."""
    if scoring.answer_names is not None and not scoring.answer_names:
        return  # trained on data without questions: no answer vocabulary to choose from
    classes = len(scoring.answer_names) if scoring.answer_names is not None else None
    labels, _, _ = predict.answer_classes(model, batch, CONTEXTS[context], classes, encoded)
    labels = [label if ok else -1 for label, ok in zip(labels.tolist(), asked)]
    out.predicted_labels.setdefault(context, []).extend(labels)
    if scoring.answer_names is not None:
        names = [scoring.answer_names[label] if label >= 0 else "" for label in labels]
        out.predicted.setdefault(context, []).extend(filtered(names, scoring.safety, out.filter_counts["answers"]))


def filtered(texts: list[str], safety: SafetyFilter | None, counts: list[int]) -> list[str]:
    """The texts as a user would see them; counts = [checked, blocked] is updated."""
    if safety is None:
        return list(texts)
    shown = []
    for text in texts:
        if not text:
            shown.append("")
            continue
        verdict = safety.check(text)
        counts[0] += 1
        counts[1] += verdict.blocked
        shown.append(verdict.text)
    return shown


def merge(parts: list[Collected]) -> Collected:
    """Several ranks' results as one (in rank order)."""
    out = Collected()
    for part in parts:
        for item in fields(Collected):
            mine, theirs = getattr(out, item.name), getattr(part, item.name)
            if item.name == "filter_counts":
                for kind, (checked, blocked) in theirs.items():
                    mine[kind][0] += checked
                    mine[kind][1] += blocked
            elif isinstance(theirs, dict):
                for key, values in theirs.items():
                    mine.setdefault(key, []).extend(values)
            else:
                mine.extend(theirs)
    return out


def gather(local: Collected) -> Collected:
    """Every rank's results, merged (itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, local)
    return merge(everything)


def modality_flags(collected: Collected) -> dict[str, np.ndarray]:
    return {m: collected.flag(m) for m in MODALITIES}
