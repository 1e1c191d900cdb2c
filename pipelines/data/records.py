"""The sample record every stage after ingest agrees on, and how member names map onto it.

A record carries each modality's raw bytes (nothing is decoded before `prepare`), so ingest
and shard are faithful carriers: what a user gave is what lands in the shards.

    key        sample key (WebDataset rule: no dot in the basename part)
    source     where it came from (shard, folder, manifest line, demo seed)
    image      encoded image bytes or null, image_ext its extension (jpg, png, webp)
    text       caption / transcript bytes (UTF-8 expected) or null
    audio      encoded audio bytes or null, audio_ext its extension (wav, flac, ...)
    json       metadata bytes (question, answer, label, ...) or null
    cls        class label bytes (the `.cls` member of classic WebDataset shards) or null
"""

from __future__ import annotations

import pyarrow as pa

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AUDIO_EXTS = ("wav", "flac", "mp3", "ogg")
TEXT_EXTS = ("txt", "text", "caption")
# Serialised Python objects: loading any of them can run arbitrary code, so they are refused.
# `pyd` is WebDataset's own extension for pickled Python data (its decoder unpickles it).
PICKLE_EXTS = ("pth", "pt", "pkl", "pickle", "pyd", "ckpt", "joblib")

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("image", pa.binary()),
        ("image_ext", pa.string()),
        ("text", pa.binary()),
        ("audio", pa.binary()),
        ("audio_ext", pa.string()),
        ("json", pa.binary()),
        ("cls", pa.binary()),
    ]
)
MODALITY_COLUMNS = {"image": "image", "text": "text", "audio": "audio"}


def field_of(ext: str) -> str | None:
    """Record column for a member extension ('xyzdata.abc1.flac' -> 'audio'), None if unknown."""
    last = ext.lower().rsplit(".", 1)[-1]
    if last in IMAGE_EXTS:
        return "image"
    if last in AUDIO_EXTS:
        return "audio"
    if last in TEXT_EXTS:
        return "text"
    if last in ("json", "cls"):
        return last
    return None


def is_pickle(ext: str, data: bytes) -> bool:
    """By extension, or by content: a pickle stream header or a torch zip archive."""
    if ext.lower().rsplit(".", 1)[-1] in PICKLE_EXTS:
        return True
    if len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5:
        return True
    return data[:4] == b"PK\x03\x04" and b"data.pkl" in data[:4096]


def empty_record(key: str, source: str) -> dict:
    return {name: None for name in SCHEMA.names} | {"key": key, "source": source}


def combination(record: dict) -> str:
    """'image+text+audio' style label of the modalities a record has."""
    present = [name for name in ("image", "text", "audio") if record.get(name)]
    return "+".join(present) if present else "none"


def to_table(records: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(records, schema=SCHEMA)
