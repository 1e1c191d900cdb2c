"""A random batch with the shapes of a real one: for benchmarks, smoke tests and GPU checks."""

from __future__ import annotations

import torch

from model.config import ModelConfig
from model.tokenizer import BOS, EOS


def synthetic_batch(
    cfg: ModelConfig,
    size: int,
    seed: int = 0,
    text_len: int = 12,
    question_len: int = 6,
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """Every modality present, random tokens between <bos> and <eos>, noise images and audio."""
    g = torch.Generator().manual_seed(seed)

    def tokens(length: int) -> torch.Tensor:
        ids = torch.randint(4, cfg.vocab_size, (size, length), generator=g)
        ids[:, 0], ids[:, -1] = BOS, EOS
        return ids

    ids, question = tokens(text_len), tokens(question_len)
    answer_len = min(4, question_len)
    data = {
        "text_ids": ids,
        "text_mask": torch.ones_like(ids, dtype=torch.bool),
        "question_ids": question,
        "question_mask": torch.ones_like(question, dtype=torch.bool),
        "answer_ids": question[:, :answer_len],
        "answer_mask": torch.ones(size, answer_len, dtype=torch.bool),
        "answer_label": torch.randint(0, cfg.num_answers, (size,), generator=g),
        "image": torch.randn(size, 3, cfg.image_size, cfg.image_size, generator=g),
        "audio": 0.1 * torch.randn(size, cfg.audio_samples, generator=g),
        "audio_mask": torch.ones(size, cfg.audio_samples, dtype=torch.bool),
        "has_text": torch.ones(size, dtype=torch.bool),
        "has_image": torch.ones(size, dtype=torch.bool),
        "has_audio": torch.ones(size, dtype=torch.bool),
        "weight": torch.ones(size),
    }
    return {k: v.to(device) for k, v in data.items()} if device is not None else data
