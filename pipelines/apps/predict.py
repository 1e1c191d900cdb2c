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


def context_inputs(model, batch: dict, context: tuple[str, ...]):
    """(encoded, present) of the context modalities kept; a sample lacking all of them has no context."""
    size = batch["weight"].shape[0]
    device = next(model.parameters()).device
    wanted = {"image": ("image",), "audio": ("audio", "audio_mask")}
    inputs = {k: batch[k] for m in context for k in wanted[m] if k in batch}
    encoded = model.encode(inputs) if inputs else {}
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
def answers(
    model, answer_names: list[str], batch: dict, context: tuple[str, ...] = CONTEXT
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(answer per question, its probability, which samples had a question and some context)."""
    encoded, present, has_context = context_inputs(model, batch, context)
    question = model.encode_text(batch["question_ids"], batch["question_mask"])
    asked = batch["question_mask"][:, 0]  # a row without a question is all padding
    fused = model.fuse(dict(encoded, text=question), dict(present, text=asked))
    probs = model.answer_logits(fused).float().softmax(dim=-1)
    # Only the answers the model was trained with (the head may have spare classes).
    probs = probs[:, : len(answer_names)]
    best = probs.argmax(dim=-1)
    return [answer_names[i] for i in best.tolist()], probs.gather(1, best[:, None]).squeeze(1), asked & has_context
