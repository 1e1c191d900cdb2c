"""Batch transforms the prepare pipeline maps over Ray Data (batch_format="numpy").

decode -> keep usable -> augment (train) -> balance (train) -> tensors. Each is a plain
function of a batch, so Ray fuses them into one task and the DataLoader baseline of the
benchmark can call the same code. Heavy objects (albumentations pipelines, nlpaug augmenters,
the tokenizer) are cached per worker process.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from pipelines.config.prepare import AugmentConfig
from pipelines.data.augment import augment_audio, augment_image, augment_text, negative_captions, sample_seed
from pipelines.data.balance import copies
from pipelines.data.decode import (
    DecodeSettings,
    Unusable,
    audio_duration,
    decode_audio,
    decode_image,
    decode_meta,
    decode_text,
)

ANSWER_TOKENS = 8


# Joins a sample's negative captions in one string column (Arrow-friendly); never in text.
NEGATIVE_SEPARATOR = "\x1f"


def resolve_epoch(epoch) -> int:
    """An int, or an EpochClock actor the trainer advances (see pipelines.data.dataset)."""
    if isinstance(epoch, int):
        return epoch
    import ray

    return int(ray.get(epoch.get.remote()))


def decode_row(row: dict, settings: DecodeSettings) -> dict:
    """One reader row -> decoded fields, or the quarantine reason."""
    out = {"reason": row.get("reason") or "", "member": row.get("member") or "", "detail": row.get("detail") or ""}
    out.update(
        has_image=False,
        has_text=False,
        has_audio=False,
        text="",
        caption="",
        question="",
        answer="",
        label="",
        image=np.zeros((settings.image_size, settings.image_size, 3), np.uint8),
        audio=np.zeros(int(round(settings.sample_rate * settings.max_audio_seconds)), np.float32),
        audio_len=0,
        audio_seconds=0.0,
    )
    if out["reason"]:
        return out
    try:
        if row.get("image") is not None:
            out["image"], out["has_image"] = (
                decode_image(row["image"], settings, f"{row['key']}.{row['image_ext']}"),
                True,
            )
        if row.get("text") is not None:
            out["text"] = out["caption"] = decode_text(row["text"], settings, f"{row['key']}.txt")
            out["has_text"] = True
        if row.get("audio") is not None:
            out["audio"], out["audio_len"] = decode_audio(row["audio"], settings, f"{row['key']}.{row['audio_ext']}")
            out["audio_seconds"], out["has_audio"] = audio_duration(row["audio"]), True
        out.update(decode_meta(row.get("json"), row.get("cls"), f"{row['key']}.json"))
    except Unusable as err:
        out.update(reason=err.reason, member=err.member, detail=err.detail[:500])
    return out


def decode_batch(batch: dict[str, np.ndarray], settings: DecodeSettings) -> dict[str, np.ndarray]:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    decoded = [decode_row(row, settings) for row in rows]
    out = {name: np.array([r.get(name) or "" for r in rows], dtype=object) for name in ("key", "source", "split")}
    for name in ("reason", "member", "detail"):  # "" not None: an all-None column would reach Arrow as NaN
        out[name] = np.array([d[name] or "" for d in decoded], dtype=object)
    for name in ("text", "caption", "question", "answer", "label"):
        out[name] = np.array([d[name] for d in decoded], dtype=object)
    for name in ("has_image", "has_text", "has_audio"):
        out[name] = np.array([d[name] for d in decoded], dtype=bool)
    out["combo"] = np.array(
        ["+".join(m for m in ("image", "text", "audio") if d[f"has_{m}"]) or "none" for d in decoded], dtype=object
    )
    out["image"] = stack([d["image"] for d in decoded], (settings.image_size, settings.image_size, 3), np.uint8)
    out["audio"] = stack(
        [d["audio"] for d in decoded], (int(round(settings.sample_rate * settings.max_audio_seconds)),), np.float32
    )
    out["audio_len"] = np.array([d["audio_len"] for d in decoded], dtype=np.int32)
    out["audio_seconds"] = np.array([d["audio_seconds"] for d in decoded], dtype=np.float32)
    if "epoch" in batch:  # an EpochStream row knows its epoch
        out["epoch"] = np.asarray(batch["epoch"], dtype=np.int32)
    return out


def row_epochs(batch: dict[str, np.ndarray], epoch) -> np.ndarray:
    """Each row's epoch: its own (an EpochStream's rows carry one), else the stream's."""
    if "epoch" in batch:
        return np.asarray(batch["epoch"], dtype=np.int64)
    return np.full(len(batch["key"]), resolve_epoch(epoch), dtype=np.int64)


def stack(arrays: list[np.ndarray], shape: tuple, dtype) -> np.ndarray:
    return np.stack(arrays).astype(dtype, copy=False) if arrays else np.zeros((0, *shape), dtype)


def take(batch: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[index] for name, values in batch.items()}


def keep_usable(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    usable = np.array([not r for r in batch["reason"]], dtype=bool)
    # All usable (the usual case): the batch as it is, not a copy of every image and waveform.
    return batch if usable.all() else take(batch, np.flatnonzero(usable))


def with_epoch(batch: dict[str, np.ndarray], epoch) -> dict[str, np.ndarray]:
    return {**batch, "epoch": row_epochs(batch, epoch).astype(np.int32)}


def augment_batch(
    batch: dict[str, np.ndarray], cfg: AugmentConfig, seed: int, epoch, sample_rate: int
) -> dict[str, np.ndarray]:
    epochs = row_epochs(batch, epoch)
    batch = {name: values.copy() for name, values in batch.items()}
    negatives = cfg.negatives.p > 0  # no column at all when off: nothing to tokenize or ship
    if negatives:
        batch["negative"] = np.full(len(batch["key"]), "", dtype=object)
    for i, key in enumerate(batch["key"]):
        epoch = int(epochs[i])
        if batch["has_image"][i]:
            batch["image"][i] = augment_image(
                batch["image"][i], batch["caption"][i], cfg.image, sample_seed(seed, epoch, key, "image")
            )
        if batch["has_text"][i]:
            batch["text"][i] = augment_text(batch["text"][i], cfg.text, sample_seed(seed, epoch, key, "text"))
            # From the text the encoder reads, so the pair differs in the swapped word only.
            if negatives:
                batch["negative"][i] = NEGATIVE_SEPARATOR.join(
                    negative_captions(batch["text"][i], cfg.negatives, sample_seed(seed, epoch, key, "negative"))
                )
        if batch["has_audio"][i]:
            batch["audio"][i], batch["audio_len"][i] = augment_audio(
                batch["audio"][i],
                int(batch["audio_len"][i]),
                cfg.audio,
                sample_rate,
                sample_seed(seed, epoch, key, "audio"),
            )
    return batch


def balance_batch(
    batch: dict[str, np.ndarray], multiplicity: dict[str, float], weights: dict[str, float], seed: int, epoch
) -> dict[str, np.ndarray]:
    repeats = np.array(
        [
            copies(k, multiplicity.get(c, 1.0), seed, int(e))
            for k, c, e in zip(batch["key"], batch["combo"], row_epochs(batch, epoch))
        ],
        dtype=np.int64,
    )
    # Every row once (no combo resampled here): no copy of the images and waveforms.
    out = dict(batch) if (repeats == 1).all() else take(batch, np.repeat(np.arange(len(repeats)), repeats))
    out["weight"] = np.array([weights.get(c, 1.0) for c in out["combo"]], dtype=np.float32)
    return out


@lru_cache(maxsize=4)
def cached_tokenizer(tokenizer_json: str):
    from model.tokenizer import Tokenizer

    return Tokenizer.from_json(tokenizer_json)


def token_matrix(tokenizer, texts, width: int, present=None) -> np.ndarray:
    ids = np.zeros((len(texts), width), dtype=np.int32)
    for row, text in enumerate(texts):
        if present is None or present[row]:
            encoded = tokenizer.encode(str(text), width)
            ids[row, : len(encoded)] = encoded
    return ids


def tensor_batch(
    batch: dict[str, np.ndarray], tokenizer_json: str, answers: tuple[str, ...], max_text_len: int
) -> dict[str, np.ndarray]:
    """Numbers only: what iter_torch_batches can turn into tensors (no str, dict or bytes)."""
    tokenizer = cached_tokenizer(tokenizer_json)
    index = {answer: i for i, answer in enumerate(answers)}
    asked = np.array([bool(q) and a in index for q, a in zip(batch["question"], batch["answer"])], dtype=bool)
    tensors = {
        "text_ids": token_matrix(tokenizer, batch["text"], max_text_len, batch["has_text"]),
        "caption_ids": token_matrix(tokenizer, batch["caption"], max_text_len, batch["has_text"]),
        "question_ids": token_matrix(tokenizer, batch["question"], max_text_len, asked),
        "answer_ids": token_matrix(tokenizer, batch["answer"], ANSWER_TOKENS, asked),
        "answer_label": np.array([index[a] if ok else -100 for a, ok in zip(batch["answer"], asked)], dtype=np.int64),
        "image": batch["image"],
        "audio": batch["audio"],
        "audio_len": batch["audio_len"],
        "has_image": batch["has_image"],
        "has_text": batch["has_text"],
        "has_audio": batch["has_audio"],
        "weight": batch.get("weight", np.ones(len(batch["key"]), dtype=np.float32)),
        "sample_id": np.array([sample_seed(0, 0, k, "id") for k in batch["key"]], dtype=np.int64),
    }
    if "epoch" in batch:  # training batches only: which epoch each row belongs to
        tensors["epoch"] = np.asarray(batch["epoch"], dtype=np.int32)
    if "negative" in batch:  # training batches only (see augment_batch): (rows, count, tokens)
        count = max([1] + [len(n.split(NEGATIVE_SEPARATOR)) for n in batch["negative"] if n])
        texts = [(n.split(NEGATIVE_SEPARATOR) if n else []) + [""] * count for n in batch["negative"]]
        flat = [t for row in texts for t in row[:count]]
        ids = token_matrix(tokenizer, flat, max_text_len, [bool(t) for t in flat])
        tensors["negative_ids"] = ids.reshape(len(batch["negative"]), count, max_text_len)
    return tensors
