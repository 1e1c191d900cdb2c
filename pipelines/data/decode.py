"""Decode one sample's raw members into model-ready arrays, or say why it cannot be used.

Pure functions (no Ray): the prepare stage maps them over Ray Data batches, the DataLoader
baseline of the benchmark calls the very same ones.

- image: JPEG/PNG/WebP, EXIF orientation applied, alpha composited on white, greyscale to
  RGB, a pixel-count limit checked from the header before any pixel is decoded, resized on
  the short side and centre-cropped to the model size -> uint8 (S, S, 3);
- text: strict UTF-8, NFC, whitespace collapsed, capped in characters;
- audio: any rate, channel count and bit depth soundfile reads -> mono float32, resampled
  with soxr (HQ), finite, cropped or zero-padded to the model length with its valid length;
- json: question / answer / label; a `.cls` member is a label too.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
import warnings
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own bomb check warns at ~89 Mpx and raises at 2x; ours is explicit and configurable.
Image.MAX_IMAGE_PIXELS = None


class Unusable(ValueError):
    """A sample that cannot be used; `reason` is the quarantine reason, the message the detail."""

    def __init__(self, reason: str, member: str, detail: str = ""):
        super().__init__(detail)
        self.reason, self.member, self.detail = reason, member, detail


@dataclass(frozen=True)
class DecodeSettings:
    image_size: int = 64
    max_image_pixels: int = 40_000_000
    sample_rate: int = 16000
    max_audio_seconds: float = 1.0
    max_text_chars: int = 512


def decode_image(data: bytes, settings: DecodeSettings, member: str = "image") -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > settings.max_image_pixels:
                raise Unusable(
                    "image_too_large", member, f"{image.width}x{image.height} > {settings.max_image_pixels} pixels"
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image)
    except Unusable:
        raise
    except UnidentifiedImageError as err:
        raise Unusable("undecodable_image", member, str(err)) from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated_image" if "truncated" in str(err).lower() else "undecodable_image"
        raise Unusable(reason, member, str(err)) from None
    return np.asarray(square_resize(rgb, settings.image_size), dtype=np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size`, then centre-crop to size x size (CLIP's recipe)."""
    if image.size == (size, size):
        return image
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def decode_text(data: bytes, settings: DecodeSettings, member: str = "text") -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise Unusable("undecodable_text", member, str(err)) from None
    text = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()
    if not text:
        raise Unusable("empty_text", member, "only whitespace")
    return text[: settings.max_text_chars]


def decode_audio(data: bytes, settings: DecodeSettings, member: str = "audio") -> tuple[np.ndarray, int]:
    """(waveform of exactly max_audio_seconds at the model rate, number of valid samples)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise Unusable("bad_audio_header", member, str(err)) from None
    if wave.size == 0:
        raise Unusable("empty_audio", member, "no samples")
    if not np.isfinite(wave).all():
        raise Unusable("nonfinite_audio", member, "NaN or Inf samples")
    mono = wave.mean(axis=1)
    if rate != settings.sample_rate:
        mono = soxr.resample(mono, rate, settings.sample_rate, quality="HQ").astype(np.float32)
    length = int(round(settings.sample_rate * settings.max_audio_seconds))
    valid = min(len(mono), length)
    out = np.zeros(length, dtype=np.float32)
    out[:valid] = mono[:valid]
    return out, valid


def audio_duration(data: bytes) -> float:
    """Seconds of a clip as recorded, before the crop to max_audio_seconds (a header read)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sf.info(io.BytesIO(data)).duration)


def decode_meta(json_bytes: bytes | None, cls_bytes: bytes | None, member: str = "json") -> dict:
    """question, answer, label (strings, '' when absent) from the json and .cls members."""
    meta = {}
    if json_bytes:
        try:
            meta = json.loads(json_bytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise Unusable("invalid_json", member, str(err)) from None
        if not isinstance(meta, dict):
            raise Unusable("invalid_json", member, f"expected an object, got {type(meta).__name__}")
    label = meta.get("label", "")
    if cls_bytes:
        try:
            label = cls_bytes.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise Unusable("invalid_json", "cls", str(err)) from None
    return {
        "question": str(meta.get("question") or "").strip(),
        "answer": str(meta.get("answer") or "").strip(),
        "label": str(label),
    }
