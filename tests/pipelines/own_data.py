"""Generated data sets shaped like a user's own (not the demo world): captioned pictures of
patterns, tone sequences with transcripts, behind a JSONL manifest.

Kinds: `image_text` (pictures with captions), `audio_text` (clips with transcripts), `mixed`
(both kinds of sample, never a three-way one), and `mixed_qa` (mixed, with a question and an
answer on the pictures). Captions use their own words (patterns, colours, pitches), never the
demo world's, and are mostly distinct: a picture has two patterns, one over the other (552
captions), a clip two tones and a length (162 transcripts). Images come at several sizes and
formats, audio at 8 and 16 kHz and 1.5-4 s.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

COLOURS = {
    "teal": (0, 128, 128),
    "maroon": (128, 0, 32),
    "olive": (128, 128, 0),
    "navy": (20, 30, 110),
    "coral": (250, 120, 90),
    "amber": (255, 190, 0),
}
PATTERNS = ("stripes", "dots", "checks", "rings")
PITCHES = {"low": 220.0, "middle": 440.0, "high": 880.0}
SHAPES = ("steady", "pulsing", "rising")
KINDS = ("image_text", "audio_text", "mixed", "mixed_qa")
PNG = b"\x89PNG"


def draw_pattern(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], ink, pattern: str, step: int) -> None:
    left, top, right, bottom = box
    for x in range(left, right, step):
        for y in range(top, bottom, step):
            if pattern == "stripes" and ((x - left) // step) % 2 == 0:
                draw.rectangle([x, y, x + step // 2, y + step], fill=ink)
            elif pattern == "dots":
                draw.ellipse([x + 3, y + 3, x + step - 3, y + step - 3], fill=ink)
            elif pattern == "checks" and ((x - left) // step + (y - top) // step) % 2 == 0:
                draw.rectangle([x, y, x + step, y + step], fill=ink)
            elif pattern == "rings":
                draw.ellipse([x + 2, y + 2, x + step - 2, y + step - 2], outline=ink, width=3)


def picture(rng: np.random.Generator, upper: tuple[str, str], lower: tuple[str, str]) -> bytes:
    """(colour, pattern) in the upper half over (colour, pattern) in the lower half."""
    width, height = int(rng.integers(120, 200)), int(rng.integers(120, 200))
    image = Image.new("RGB", (width, height), (235, 235, 225))
    draw, step = ImageDraw.Draw(image), int(rng.integers(14, 24))
    draw_pattern(draw, (0, 0, width, height // 2), COLOURS[upper[0]], upper[1], step)
    draw_pattern(draw, (0, height // 2, width, height), COLOURS[lower[0]], lower[1], step)
    out = io.BytesIO()
    image.save(out, format="PNG" if rng.random() < 0.3 else "JPEG")
    return out.getvalue()


def tone(t: np.ndarray, rate: int, pitch: str, shape: str) -> np.ndarray:
    span = t[-1] - t[0] + 1 / rate
    base = PITCHES[pitch]
    frequency = base * (1 + (t - t[0]) / span) if shape == "rising" else np.full_like(t, base)
    wave = 0.3 * np.sin(2 * np.pi * np.cumsum(frequency) / rate)
    return wave * (np.sin(2 * np.pi * 3 * t) > 0) if shape == "pulsing" else wave


def clip(rng: np.random.Generator, first: tuple[str, str], second: tuple[str, str], long: bool) -> bytes:
    """Two tones, each (pitch, shape), one after the other; `long` clips last 2.8-4 s."""
    rate = 8000 if rng.random() < 0.5 else 16000
    seconds = float(rng.uniform(2.8, 4.0) if long else rng.uniform(1.5, 2.6))
    t = np.arange(int(rate * seconds)) / rate
    half = len(t) // 2
    wave = np.concatenate([tone(t[:half], rate, *first), tone(t[half:], rate, *second)])
    wave += 0.01 * rng.standard_normal(len(t))
    out = io.BytesIO()
    sf.write(out, wave.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def write(root: Path, kind: str, count: int, seed: int = 0) -> Path:
    """`count` samples of `kind` as files plus a JSONL manifest; returns the manifest's path."""
    assert kind in KINDS, kind
    rng = np.random.default_rng(seed)
    media = root / "media"
    media.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        key = f"item{index:05d}"
        pictured = kind == "image_text" or (kind.startswith("mixed") and index % 3 != 2)
        if pictured:
            colours = rng.choice(list(COLOURS), size=2, replace=False)
            upper, lower = (colours[0], rng.choice(PATTERNS)), (colours[1], rng.choice(PATTERNS))
            data = picture(rng, upper, lower)
            name = f"{key}.png" if data.startswith(PNG) else f"{key}.jpg"
            (media / name).write_bytes(data)
            text = f"{upper[0]} {upper[1]} over {lower[0]} {lower[1]}"
            entry = {"key": key, "image": f"media/{name}", "text": text}
            if kind == "mixed_qa":
                entry |= {"question": "which colour is over the other?", "answer": str(upper[0])}
        else:
            first = (rng.choice(list(PITCHES)), rng.choice(SHAPES))
            second = (rng.choice(list(PITCHES)), rng.choice(SHAPES))
            long = bool(rng.random() < 0.5)
            (media / f"{key}.wav").write_bytes(clip(rng, first, second, long))
            text = f"a {'long' if long else 'short'} {first[1]} {first[0]} hum then a {second[1]} {second[0]} one"
            entry = {"key": key, "audio": f"media/{key}.wav", "text": text}
        lines.append(json.dumps(entry))
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest
