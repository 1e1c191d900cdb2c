"""One pass of a model over an evaluation split: what every metric and plot needs, per sample.

Generation runs once per context (see CONTEXTS): the full context, and each context modality
alone, which is how missing-modality robustness is measured. Generated text goes through the
content filter here, so every figure describes what a user would actually be shown.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from model.config import MODALITIES
from pipelines.apps import predict
from pipelines.apps.safety import SafetyFilter

# name -> the context modalities generation may use
CONTEXTS = {"image_audio": ("image", "audio"), "image": ("image",), "audio": ("audio",)}


@dataclass
class Collected:
    embeddings: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    present: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    references: list[str] = field(default_factory=list)  # the clean caption ("" = none)
    questions: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # the reference answer ("" = no question)
    captions: dict[str, list[str]] = field(default_factory=dict)  # context -> generated caption
    predicted: dict[str, list[str]] = field(default_factory=dict)  # context -> predicted answer
    # kind ("captions"/"answers") -> [checked, blocked] by the content filter, over every context
    filter_counts: dict[str, list[int]] = field(default_factory=lambda: {"captions": [0, 0], "answers": [0, 0]})
    images: list[np.ndarray] = field(default_factory=list)  # uint8 HWC thumbnails of the first samples
    audio: list[np.ndarray] = field(default_factory=list)  # waveforms of the first samples

    def stacked(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return (
            {m: torch.cat(v) for m, v in self.embeddings.items()},
            {m: torch.cat(v) for m, v in self.present.items()},
        )

    def flag(self, modality: str) -> np.ndarray:
        return (
            torch.cat(self.present[modality]).numpy()
            if modality in self.present
            else np.zeros(len(self.references), bool)
        )


@torch.no_grad()
def collect(
    model,
    tokenizer,
    answer_names: list[str],
    batches: Iterable[tuple[dict, dict]],
    safety: SafetyFilter,
    beam_size: int = 1,
    max_tokens: int = 32,
    keep_media: int = 64,
) -> Collected:
    """`batches` yields (model batch, raw tensors) pairs: the raw images and waveforms feed the plots."""
    out = Collected()
    for batch, raw in batches:
        size = batch["weight"].shape[0]
        encoded = model.encode(batch)
        for m, e in model.embed(encoded).items():
            out.embeddings.setdefault(m, []).append(e.float().cpu())
            out.present.setdefault(m, []).append(model.present(batch, m, size, e.device).cpu())
        has_text = batch["has_text"].tolist()
        out.references += [
            tokenizer.decode(ids) if ok else "" for ids, ok in zip(batch["caption_ids"].tolist(), has_text)
        ]
        asked = (batch["answer_label"] >= 0).tolist()
        out.questions += [tokenizer.decode(ids) if ok else "" for ids, ok in zip(batch["question_ids"].tolist(), asked)]
        out.answers += [answer_names[label] if ok else "" for label, ok in zip(batch["answer_label"].tolist(), asked)]
        for name, context in CONTEXTS.items():
            texts, _ = predict.captions(model, tokenizer, batch, context, beam_size, max_tokens)
            out.captions.setdefault(name, []).extend(filtered(texts, safety, out.filter_counts["captions"]))
            names, _, _ = predict.answers(model, answer_names, batch, context)
            names = [n if ok else "" for n, ok in zip(names, asked)]
            out.predicted.setdefault(name, []).extend(filtered(names, safety, out.filter_counts["answers"]))
        room = keep_media - len(out.images)
        if room > 0:
            out.images += list(raw["image"][:room].numpy())
            out.audio += list(raw["audio"][:room].numpy())
    return out


def filtered(texts: list[str], safety: SafetyFilter, counts: list[int]) -> list[str]:
    """The texts as a user would see them; counts = [checked, blocked] is updated."""
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


def modality_flags(collected: Collected) -> dict[str, np.ndarray]:
    return {m: collected.flag(m) for m in MODALITIES}
