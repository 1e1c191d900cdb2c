"""Consumer side: the tensors Ray Data hands a train worker -> the model's batch dict.

Runs in the train worker (iter_torch_batches' collate_fn), so only cheap tensor ops here:
masks from padding and lengths, images to normalised float CHW, text trimmed to the longest.
"""

from __future__ import annotations

import numpy as np
import torch

from model.tokenizer import PAD

IMAGE_MEAN, IMAGE_STD = 0.5, 0.25


def trim(ids: torch.Tensor) -> torch.Tensor:
    """Drop the columns that are padding in every row (keeps at least <bos><eos>)."""
    used = int((ids != PAD).any(dim=0).nonzero().max().item()) + 1 if (ids != PAD).any() else 2
    return ids[:, : max(used, 2)]


def to_model_batch(batch: dict[str, torch.Tensor], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Model inputs from a numeric batch; with `device`, moved there. Text is trimmed where it is
    (a small tensor; trimming on a GPU would wait for it), images and audio are moved as they come
    (uint8 images: a quarter of the bytes) and normalised and masked on the device."""
    move = (lambda t: t.to(device, non_blocking=True)) if device is not None else (lambda t: t)
    out = {}
    for name in ("text", "caption", "question", "answer", "negative"):
        if f"{name}_ids" not in batch:  # negatives: training batches only
            continue
        ids = batch[f"{name}_ids"].long()
        ids = move(trim(ids.flatten(0, 1) if ids.dim() == 3 else ids))  # negatives: (rows, count, tokens)
        out[f"{name}_ids"], out[f"{name}_mask"] = ids, ids != PAD
    out["answer_label"] = move(batch["answer_label"]).long()
    out["image"] = (move(batch["image"]).permute(0, 3, 1, 2).float() / 255.0 - IMAGE_MEAN) / IMAGE_STD
    audio = move(batch["audio"]).float()
    out["audio"] = audio
    out["audio_mask"] = torch.arange(audio.shape[1], device=audio.device)[None, :] < move(batch["audio_len"])[:, None]
    for name in ("has_image", "has_text", "has_audio"):
        out[name] = move(batch[name]).bool()
    out["weight"] = move(batch["weight"]).float()
    out["sample_id"] = move(batch["sample_id"])
    if "epoch" in batch:  # training streams: each row's data epoch (the loop logs it, the model never sees it)
        out["epoch"] = batch["epoch"]  # stays on the host: the loop reads it every step
    return out


def numpy_to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in batch.items()}
