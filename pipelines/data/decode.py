"""Decode one sample's raw members into model-ready arrays, or say why it cannot be used.

Pure functions (no Ray): the prepare stage maps them over Ray Data batches, the DataLoader
baseline of the benchmark calls the very same ones.

- image: JPEG/PNG/WebP, EXIF orientation applied, alpha composited on white, greyscale to
  RGB, a pixel-count limit and a minimum side checked from the header before any pixel is
  decoded, resized on the short side and centre-cropped to the model size -> uint8 (S, S, 3);
  `truncated_image` only when the header was read whole and the pixel data stops early, any
  other failure (random bytes behind a magic number, a cut inside the header) is
  `undecodable_image`;
- text: strict UTF-8, NFC, whitespace collapsed, capped in characters;
- audio: any rate, channel count and bit depth soundfile reads -> mono float32, resampled
  with soxr (HQ), finite, cropped or zero-padded to the model length with its valid length;
  only the frames the model uses are read (an hour-long clip costs what a second costs), and
  a stream that breaks after a good header is `truncated_audio`;
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
    min_image_side: int = 16


def decode_image(data: bytes, settings: DecodeSettings, member: str = "image") -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        # The header itself is unreadable: whether cut or garbage cannot be told apart.
        raise Unusable("undecodable_image", member, str(err) or type(err).__name__) from None
    with image:
        check_image_size(image, settings, member)
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image)
        except (OSError, SyntaxError, ValueError) as err:
            reason = "truncated_image" if "truncated" in str(err).lower() else "undecodable_image"
            raise Unusable(reason, member, str(err)) from None
    return np.asarray(square_resize(rgb, settings.image_size), dtype=np.uint8)


def check_image_size(image: Image.Image, settings: DecodeSettings, member: str) -> None:
    """From the header, before any pixel is decoded: bombs and images too small to be of use."""
    if image.width * image.height > settings.max_image_pixels:
        raise Unusable("image_too_large", member, f"{image.width}x{image.height} > {settings.max_image_pixels} pixels")
    if min(image.size) < settings.min_image_side:
        raise Unusable(
            "image_too_small",
            member,
            f"{image.width}x{image.height}: a side under prepare.min_image_side={settings.min_image_side} pixels",
        )


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            clip = sf.SoundFile(io.BytesIO(data))
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
            raise Unusable("bad_audio_header", member, str(err)) from None
        with clip:
            rate = clip.samplerate
            # A few frames past the model's length keep the resampler's edge the same as a whole read.
            needed = int(np.ceil(rate * settings.max_audio_seconds)) + 64
            try:
                wave = clip.read(frames=needed, dtype="float32", always_2d=True)
            except (sf.LibsndfileError, RuntimeError) as err:
                raise Unusable("truncated_audio", member, str(err)) from None
            if len(wave) < min(needed, clip.frames):
                raise Unusable("truncated_audio", member, f"the stream ends at frame {len(wave)} of {clip.frames}")
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
    for name in ("question", "answer", "label"):
        value = meta.get(name)
        # A number is a fine answer or label; a list or an object would reach the tokenizer as
        # its Python repr ("['what']"), and a bool as "True".
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int | float)):
            raise Unusable("invalid_json", member, f"{name} must be a string or a number, got {type(value).__name__}")
    label = meta.get("label", "")
    if cls_bytes:
        try:
            label = cls_bytes.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise Unusable("invalid_json", "cls", str(err)) from None
    return {
        "question": str(meta.get("question") or "").strip(),
        "answer": str(meta.get("answer") if meta.get("answer") is not None else "").strip(),
        "label": str(label if label is not None else ""),
    }
