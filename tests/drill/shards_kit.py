"""Bytes for the bad-input drill: good samples, broken images, audio, text and JSON, and tars.

Everything is small (32 px images, a quarter second of audio) so one pipeline run over every
kind stays quick. Nothing here touches the pipeline: pipelines/data reads what this writes.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

RATE = 16000
TAR_BLOCK = 512


# -- media ---------------------------------------------------------------------------------------
def jpeg(seed: int = 0, size: int = 32) -> bytes:
    """A small photo-like JPEG (a gradient with noise: it has real scan data to cut into)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, :, None] * np.array([1.0, 0.6, 0.3])
    pixels = np.clip(ramp + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png(size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(side: int = 100_000) -> bytes:
    """A valid PNG header declaring side x side pixels (10^10 here) over a few hundred bytes:
    decoding it would need tens of GB."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    pixels = png_chunk(b"IDAT", zlib.compress(b"\0" * 4096))
    return b"\x89PNG\r\n\x1a\n" + header + pixels + png_chunk(b"IEND", b"")


def png_bad_crc() -> bytes:
    """A good PNG whose IHDR checksum is wrong (bytes 29-32 of the file)."""
    data = bytearray(png())
    data[29] ^= 0xFF
    return bytes(data)


def random_behind_jpeg_magic(seed: int = 1, size: int = 3000) -> bytes:
    return b"\xff\xd8\xff\xe0" + np.random.default_rng(seed).bytes(size)


def jpeg_scan_start(data: bytes) -> int:
    """Offset of the first byte after the JPEG's start-of-scan header (where pixels begin)."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + struct.unpack(">H", data[sos + 2 : sos + 4])[0]


def wav(samples: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(samples, dtype=np.float32), rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


def tone(seconds: float = 0.25, hz: float = 440.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


def flac(samples: np.ndarray, rate: int = RATE) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(samples, dtype=np.float32), rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def flac_hour(rate: int = 8000) -> bytes:
    """An hour of quiet noise-free audio as FLAC (~90 kB: silence compresses), written a
    minute at a time: decoded whole it is 115 MB of float32."""
    buffer = io.BytesIO()
    minute = np.zeros(rate * 60, dtype=np.float32)
    minute[::4000] = 0.01  # not pure digital silence
    with sf.SoundFile(buffer, "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16") as clip:
        for _ in range(60):
            clip.write(minute)
    return buffer.getvalue()


def wav_corrupt_header() -> bytes:
    return b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\xee" * 40


def wav_zero_data_chunk() -> bytes:
    """A WAV whose data chunk declares 0 bytes while samples follow (a streaming writer that
    never went back to fill in the size)."""
    data = bytearray(wav(tone()))
    at = data.index(b"data")
    data[at + 4 : at + 8] = b"\0\0\0\0"
    return bytes(data)


# -- samples ---------------------------------------------------------------------------------------
def caption(key: str) -> bytes:
    return f"a café photo ✓ of {key}, with its own words".encode()


def good_members(key: str, seed: int = 0) -> list[tuple[str, bytes]]:
    """A full sample (img2dataset order: the image first)."""
    return [
        (f"{key}.jpg", jpeg(seed)),
        (f"{key}.txt", caption(key)),
        (f"{key}.wav", wav(tone(hz=300 + 40 * (seed % 10)))),
        (f"{key}.json", json.dumps({"question": "what is shown?", "answer": "a photo"}).encode()),
    ]


class Planted:
    """Unpickled, it creates `marker`: the proof that a member was never unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_pickle(marker: Path) -> bytes:
    return pickle.dumps(Planted(marker), protocol=4)


def planted_torch(marker: Path) -> bytes:
    """A `.pth` laid out as torch.save writes it (a zip of archive/data.pkl, version, byteorder)
    around the planted object: torch.load(weights_only=False) would run it. Built with zipfile,
    so the drill does not import torch for it."""
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"weights": Planted(marker)}, protocol=2))
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


# -- tars ------------------------------------------------------------------------------------------
def member_info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size, info.mtime = kind, link, size, 0
    return info


def tar_bytes(members: list, end_blocks: bool = True) -> bytes:
    """A tar of (name, data) members, or (TarInfo, None) for links; GNU format, like most tools."""
    buffer = io.BytesIO()
    archive = tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT)
    for name, data in members:
        if isinstance(name, tarfile.TarInfo):
            archive.addfile(name)
        else:
            archive.addfile(member_info(name, len(data)), io.BytesIO(data))
    if end_blocks:
        archive.close()
    return buffer.getvalue()


def member_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """name -> (offset of its header, offset of its data) in a plain tar."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        return {info.name: (info.offset, info.offset_data) for info in archive.getmembers()}


def gzip_corrupt_tail(head: list[tuple[str, bytes]], tail: list[tuple[str, bytes]]) -> bytes:
    """A .tar.gz of two gzip members (readers take concatenated members as one stream): the
    first holds `head` whole, the second `tail` with a byte of its payload flipped, so its
    checksum fails and the stream cannot be trusted from there on."""
    plain = tar_bytes(head + tail)
    split = member_offsets(plain)[tail[0][0]][0]
    second = bytearray(gzip.compress(plain[split:], mtime=0))
    second[len(second) // 2] ^= 0xFF
    return gzip.compress(plain[:split], mtime=0) + bytes(second)
