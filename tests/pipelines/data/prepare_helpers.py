"""Shared builders for prepare tests: crafted shards and a DatasetSpec over given shards."""

from __future__ import annotations

import io
import math
import tarfile

import numpy as np
import soundfile as sf
from PIL import Image

from model.tokenizer import Tokenizer
from pipelines.config.prepare import AugmentConfig
from pipelines.data.dataset import DatasetSpec
from pipelines.data.decode import DecodeSettings


def jpeg(colour=(200, 30, 30), size=32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def wav(samples, rate=16000, subtype="PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(samples, dtype=np.float32), rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def tone(seconds=0.5, rate=16000, hz=440.0):
    return 0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)


def add(archive, name: str, data: bytes = b"", kind=tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def good(archive, key: str, caption: str = "a red square"):
    add(archive, f"{key}.jpg", jpeg())
    add(archive, f"{key}.txt", caption.encode())
    add(archive, f"{key}.wav", wav(tone()))
    add(archive, f"{key}.json", b'{"question": "what colour is the square?", "answer": "red"}')


# Every quarantine reason of the issue, one crafted sample each, between good samples.
BAD_SAMPLES = {
    # Cut in the pixel data: a cut inside the header is undecodable_image (see decode_image).
    "truncated_image": lambda a: (add(a, "trunc.jpg", jpeg()[:-8]), add(a, "trunc.txt", b"x")),
    "empty_member": lambda a: (add(a, "hollow.jpg", b""), add(a, "hollow.txt", b"x")),
    "undecodable_text": lambda a: add(a, "latin.txt", "caf\xe9 au lait".encode("latin-1")),
    "bad_audio_header": lambda a: (
        add(a, "noheader.wav", b"RIFF\x10\x00\x00\x00WAVEfmt garbage"),
        add(a, "noheader.txt", b"x"),
    ),
    "nonfinite_audio": lambda a: (
        add(a, "nan.wav", wav(np.full(800, math.nan), subtype="FLOAT")),
        add(a, "nan.txt", b"x"),
    ),
    "oversized_member": lambda a: (add(a, "huge.jpg", b"\xff" * 300_000), add(a, "huge.txt", b"x")),
    "unknown_extension": lambda a: add(a, "odd.xyz", b"payload"),
    "pickle_member": lambda a: add(a, "weights.pth", b"\x80\x04\x95anything"),
    "unsafe_name": lambda a: add(a, "../escape.txt", b"x"),
    "not_regular_file": lambda a: add(a, "link.txt", kind=tarfile.SYMTYPE, link="/etc/passwd"),
}


def crafted_shard(path, reasons=tuple(BAD_SAMPLES)) -> list[str]:
    """A tar: good0, then each bad sample followed by a good one. Returns the good keys."""
    keys = ["good0"]
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        good(archive, "good0")
        for i, reason in enumerate(reasons, start=1):
            BAD_SAMPLES[reason](archive)
            good(archive, f"good{i}")
            keys.append(f"good{i}")
    return keys


def spec_for(
    shards: dict[str, list[str]],
    texts=("a red square", "what colour is the square?", "red"),
    member_limit=200_000,
    **overrides,
) -> DatasetSpec:
    tokenizer = Tokenizer.train(list(texts) * 10, vocab_size=300)
    fields = dict(
        shards=shards,
        decode=DecodeSettings(image_size=32, max_audio_seconds=1.0).__dict__,
        tokenizer_json=tokenizer.to_json(),
        answers=["red"],
        max_text_len=16,
        augment=AugmentConfig(),
        multiplicity={},
        weights={},
        seed=0,
        member_limit=member_limit,
        batch_size=8,
    )
    return DatasetSpec(**(fields | overrides))
