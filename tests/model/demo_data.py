"""Demo-world samples as model batches, for model tests (the prepare stage does this for real)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from model.config import ModelConfig
from model.tokenizer import Tokenizer
from pipelines.data.demo_world import ANSWERS, DemoWorld


def world_for(cfg: ModelConfig, seed: int = 0, **kwargs) -> DemoWorld:
    return DemoWorld(
        seed=seed,
        image_size=cfg.image_size,
        sample_rate=cfg.sample_rate,
        audio_seconds=cfg.audio_seconds,
        audio_format="wav",
        **kwargs,
    )


def corpus(world: DemoWorld, count: int) -> list[str]:
    texts = []
    for i in range(count):
        record = world.sample(i)
        meta = json.loads(record["json"])
        texts += [record["text"].decode(), meta["question"], meta["answer"]]
    return texts


def image_tensor(data: bytes) -> torch.Tensor:
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0
    return (torch.from_numpy(pixels).permute(2, 0, 1) - 0.5) / 0.25


def batch_of(world: DemoWorld, indices, tokenizer: Tokenizer, cfg: ModelConfig) -> dict:
    records = [world.sample(i) for i in indices]
    metas = [json.loads(r["json"]) for r in records]
    batch = {}
    batch["text_ids"], batch["text_mask"] = tokenizer.batch([r["text"].decode() for r in records], cfg.max_text_len)
    batch["question_ids"], batch["question_mask"] = tokenizer.batch([m["question"] for m in metas], cfg.max_text_len)
    batch["answer_ids"], batch["answer_mask"] = tokenizer.batch([m["answer"] for m in metas], cfg.max_text_len)
    batch["answer_label"] = torch.tensor([ANSWERS.index(m["answer"]) for m in metas])
    batch["has_text"] = torch.ones(len(records), dtype=torch.bool)
    batch["has_image"] = torch.tensor([r["image"] is not None for r in records])
    batch["image"] = torch.stack(
        [
            image_tensor(r["image"]) if r["image"] is not None else torch.zeros(3, cfg.image_size, cfg.image_size)
            for r in records
        ]
    )
    batch["has_audio"] = torch.tensor([r["audio"] is not None for r in records])
    waves = [
        torch.from_numpy(sf.read(io.BytesIO(r["audio"]), dtype="float32")[0])
        if r["audio"] is not None
        else torch.zeros(cfg.audio_samples)
        for r in records
    ]
    batch["audio"] = torch.stack([w[: cfg.audio_samples] for w in waves])
    batch["audio_mask"] = torch.ones_like(batch["audio"], dtype=torch.bool)
    batch["weight"] = torch.ones(len(records))
    return batch


def memorise(model, batch: dict, objective, steps: int = 300) -> tuple[dict, dict]:
    """Train `model` on one batch (AdamW, 30 warm-up steps); (first step's, last step's) loss parts.
    On every core: the project's environment gives each process one thread (for Ray's workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        return train_steps(model, batch, objective, steps)
    finally:
        torch.set_num_threads(threads)


def train_steps(model, batch: dict, objective, steps: int) -> tuple[dict, dict]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 30))
    first = parts = None
    for _ in range(steps):
        loss, parts = objective(model, batch)
        first = first or parts
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warmup.step()
    return first, parts
