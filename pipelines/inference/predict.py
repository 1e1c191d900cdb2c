"""What a trained model produces for a batch: embeddings, captions, answers. Plain PyTorch over
the model batch (see model.multimodal), shared by the applications and the evaluate stage.

`context` names the modalities a generated text may look at, so the same call measures
captioning from image and audio, from the image alone or from the audio alone.
"""

from __future__ import annotations

import numpy as np
import torch

from model.tokenizer import Tokenizer

CONTEXT = ("image", "audio")


@torch.no_grad()
def embed(model, batch: dict) -> dict[str, np.ndarray]:
    """L2-normalised embeddings of every modality in the batch, as float32 arrays."""
    return {m: e.float().cpu().numpy() for m, e in model.embed(model.encode(batch)).items()}


def context_inputs(model, batch: dict, context: tuple[str, ...], encoded: dict | None = None):
    """(encoded, present, has_context) of the context modalities kept; a sample lacking all of
    them has no context. `encoded`: the batch's encoder outputs when already computed."""
    size = batch["weight"].shape[0]
    device = next(model.parameters()).device
    if encoded is None:
        wanted = {"image": ("image",), "audio": ("audio", "audio_mask")}
        inputs = {k: batch[k] for m in context for k in wanted[m] if k in batch}
        encoded = model.encode(inputs) if inputs else {}
    encoded = {m: e for m, e in encoded.items() if m in context}
    present = {m: model.present(batch, m, size, device) for m in encoded}
    has_context = torch.stack(list(present.values())).any(dim=0) if present else torch.zeros(size, dtype=torch.bool)
    return encoded, present, has_context


@torch.no_grad()
def captions(
    model, tokenizer: Tokenizer, batch: dict, context: tuple[str, ...] = CONTEXT, beam_size: int = 1, max_len: int = 32
) -> tuple[list[str], torch.Tensor]:
    """(caption per sample, which samples had any context to caption from)."""
    encoded, present, has_context = context_inputs(model, batch, context)
    if not encoded:
        return [""] * len(has_context), has_context
    fused = model.fuse(encoded, present)
    tokens = model.generate(fused, max_len=max_len, beam_size=beam_size)
    return [tokenizer.decode(t) if ok else "" for t, ok in zip(tokens, has_context.tolist())], has_context


@torch.no_grad()
def answer_classes(
    model, batch: dict, context: tuple[str, ...] = CONTEXT, classes: int | None = None, encoded: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answer class per question, its probability, which samples had a question and some
    context), choosing among the first `classes` answers (the head may have spare classes)."""
    encoded, present, has_context = context_inputs(model, batch, context, encoded)
    question = model.encode_text(batch["question_ids"], batch["question_mask"])
    asked = batch["question_mask"][:, 0]  # a row without a question is all padding
    fused = model.fuse(dict(encoded, text=question), dict(present, text=asked))
    probs = model.answer_logits(fused).float().softmax(dim=-1)[:, :classes]
    best = probs.argmax(dim=-1)
    return best, probs.gather(1, best[:, None]).squeeze(1), asked & has_context.to(asked.device)


def answers(
    model, answer_names: list[str], batch: dict, context: tuple[str, ...] = CONTEXT
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(answer per question, its probability, which samples had a question and some context)."""
    if not answer_names:
        raise ValueError("the model has no answer vocabulary (it was trained on data without questions)")
    best, probs, asked = answer_classes(model, batch, context, len(answer_names))
    return [answer_names[i] for i in best.tolist()], probs, asked
