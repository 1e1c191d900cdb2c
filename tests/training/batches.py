"""Synthetic model batches for training tests (shapes of a real prepared batch)."""

from __future__ import annotations

import socket

import torch


def synthetic_model_batch(cfg, size: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.vocab_size, (size, 12), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    question = torch.randint(4, cfg.vocab_size, (size, 6), generator=g)
    question[:, 0], question[:, -1] = 1, 2
    return {
        "text_ids": ids, "text_mask": torch.ones_like(ids, dtype=torch.bool),
        "question_ids": question, "question_mask": torch.ones_like(question, dtype=torch.bool),
        "answer_ids": question[:, :3], "answer_mask": torch.ones(size, 3, dtype=torch.bool),
        "answer_label": torch.randint(0, cfg.num_answers, (size,), generator=g),
        "image": torch.randn(size, 3, cfg.image_size, cfg.image_size, generator=g),
        "audio": 0.1 * torch.randn(size, cfg.audio_samples, generator=g),
        "audio_mask": torch.ones(size, cfg.audio_samples, dtype=torch.bool),
        "has_text": torch.ones(size, dtype=torch.bool), "has_image": torch.ones(size, dtype=torch.bool),
        "has_audio": torch.ones(size, dtype=torch.bool), "weight": torch.ones(size),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
