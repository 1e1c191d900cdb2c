"""Per-modality augmentation (F10), reproducible from (seed, epoch, key) and fresh each epoch.

images: albumentations (random resized crop, small rotation, colour jitter, blur, and a
horizontal flip only when the caption has no left/right words, so it stays true);
text: nlpaug (word swap/delete, keyboard and OCR typos, spelling errors, synonyms from a table
the project ships, or WordNet when the user points at an NLTK data folder);
audio: nlpaug (noise, shift, loudness, mask, speed and pitch through librosa).

Each op fires with its own probability from the config. The ranges are kept small on
purpose: a colour, a position or a pitch is a label in this data, and an augmentation that
changes a label teaches the model something false (hue jitter, for one, is nearly off).
"""

from __future__ import annotations

import hashlib
import random
import re
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipelines.config.prepare import AudioAugment, ImageAugment, NegativeCaptions, TextAugment, word_groups
from pipelines.patches import import_nlpaug

SYNONYMS_FILE = Path(__file__).with_name("synonyms.txt")
CONTRAST_FILE = Path(__file__).with_name("contrast_words.txt")
LEFT_RIGHT = re.compile(r"\b(left|right)\b|[左右]", re.IGNORECASE)


def seed_everything(seed: int) -> None:
    """Seed what nlpaug draws from (python's and numpy's global generators). nlpaug's own
    Randomness.seed also seeds torch and CUDA, which costs ~1 ms per call for nothing here."""
    random.seed(seed)
    np.random.seed(seed)


def sample_seed(seed: int, epoch: int, key: str, salt: str) -> int:
    digest = hashlib.blake2b(f"{seed}:{epoch}:{key}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


# -- images ------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def image_pipeline(cfg: ImageAugment, size: int, flip: bool):
    import albumentations as A
    import cv2

    # One OpenCV thread per worker process: the data workers already use every core, and
    # OpenCV's own pool on top of them oversubscribes the CPU (3x slower here).
    cv2.setNumThreads(1)

    ops = [
        A.RandomResizedCrop(size=(size, size), scale=cfg.crop_scale, ratio=(0.9, 1.1), p=cfg.p_crop),
        A.Affine(
            rotate=(-cfg.max_rotate_degrees, cfg.max_rotate_degrees), border_mode=cv2.BORDER_REPLICATE, p=cfg.p_rotate
        ),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=cfg.p_color),
        A.GaussianBlur(blur_limit=(3, 3), p=cfg.p_blur),
    ]
    if flip:
        ops.append(A.HorizontalFlip(p=cfg.p_flip))
    return A.Compose(ops)


def augment_image(pixels: np.ndarray, caption: str, cfg: ImageAugment, seed: int) -> np.ndarray:
    pipeline = image_pipeline(cfg, pixels.shape[0], flip=not LEFT_RIGHT.search(caption))
    pipeline.set_random_seed(seed)
    return pipeline(image=pixels)["image"]


# -- text --------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def text_ops(cfg: TextAugment) -> list[tuple[float, object]]:
    nac = import_nlpaug("nlpaug.augmenter.char")
    naw = import_nlpaug("nlpaug.augmenter.word")

    ops = [
        (cfg.p_swap, naw.RandomWordAug(action="swap", aug_max=1)),
        (cfg.p_delete, naw.RandomWordAug(action="delete", aug_max=1)),
        (cfg.p_keyboard, nac.KeyboardAug(aug_word_max=1, aug_char_max=1)),
        (cfg.p_ocr, nac.OcrAug(aug_word_max=1, aug_char_max=1)),
        (cfg.p_spelling, naw.SpellingAug(aug_max=1)),
        (cfg.p_synonym, naw.ReservedAug(reserved_tokens=word_groups(cfg.synonyms_file or SYNONYMS_FILE), aug_max=2)),
    ]
    if cfg.wordnet_data:
        import nltk

        nltk.data.path.insert(0, cfg.wordnet_data)
        ops.append((cfg.p_synonym, naw.SynonymAug(aug_src="wordnet", aug_max=1)))
    return ops


def augment_text(text: str, cfg: TextAugment, seed: int) -> str:
    chooser = random.Random(seed)
    for index, (probability, op) in enumerate(text_ops(cfg)):
        if chooser.random() < probability:
            seed_everything(seed + index)
            out = op.augment(text)
            text = (out[0] if isinstance(out, list) else out) or text
    return text


@lru_cache(maxsize=4)
def contrast_table(words_file: str | None) -> dict[str, list[str]]:
    """word -> the other words of its group."""
    groups = word_groups(words_file or CONTRAST_FILE)
    return {w.lower(): [o for o in g if o.lower() != w.lower()] for g in groups for w in g}


WORD = re.compile(r"[^\W\d_]+")


def negative_captions(text: str, cfg: NegativeCaptions, seed: int) -> list[str]:
    """Up to `count` distinct one-word contradictions of `text`; none when the draw skips the
    sample or no word can change. (Plain Python, not nlpaug's ReservedAug: that costs 3.7 ms a
    call, a third of a core at the demo's training speed; this costs microseconds.)"""
    rng = random.Random(seed)
    if cfg.p <= 0 or rng.random() >= cfg.p:
        return []
    table = contrast_table(cfg.words_file)
    swaps = [(m.start(), m.end(), other) for m in WORD.finditer(text) for other in table.get(m.group().lower(), ())]
    chosen = rng.sample(swaps, min(cfg.count, len(swaps)))
    return [text[:start] + match_case(text[start:end], other) + text[end:] for start, end, other in chosen]


def match_case(original: str, word: str) -> str:
    return (
        word.upper()
        if original.isupper() and len(original) > 1
        else word.capitalize()
        if original[:1].isupper()
        else word
    )


# -- audio -------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def audio_ops(cfg: AudioAugment, rate: int) -> list[tuple[float, object]]:
    """(probability, op) in a fixed order; an op that never runs is not built (speed and pitch need
    librosa, which a GPU image may lack)."""
    naa = import_nlpaug("nlpaug.augmenter.audio")

    whole = {"zone": (0.0, 1.0), "coverage": 1.0}
    makers = [
        (cfg.p_noise, lambda: naa.NoiseAug(**whole, color="white")),
        (cfg.p_shift, lambda: naa.ShiftAug(rate, duration=cfg.max_shift_seconds)),
        (cfg.p_loudness, lambda: naa.LoudnessAug(**whole, factor=cfg.loudness)),
        (cfg.p_mask, lambda: naa.MaskAug(rate, zone=(0.0, 1.0), coverage=cfg.mask_coverage, mask_with_noise=False)),
        (cfg.p_speed, lambda: naa.SpeedAug(**whole, factor=cfg.speed)),
        (cfg.p_pitch, lambda: naa.PitchAug(rate, **whole, factor=cfg.pitch_semitones)),
    ]
    return [(probability, make() if probability > 0 else None) for probability, make in makers]


def augment_audio(wave: np.ndarray, valid: int, cfg: AudioAugment, rate: int, seed: int) -> tuple[np.ndarray, int]:
    """Augments the valid part only, then pads/crops back to the same length."""
    if valid < 2:
        return wave, valid
    chooser = random.Random(seed)
    clip = wave[:valid].astype(np.float32)
    for index, (probability, op) in enumerate(audio_ops(cfg, rate)):
        if chooser.random() < probability:
            seed_everything(seed + index)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = op.augment(clip)
            clip = np.asarray(out[0] if isinstance(out, list) else out, dtype=np.float32)
    clip = np.nan_to_num(np.clip(clip, -1.0, 1.0))
    out = np.zeros_like(wave)
    kept = min(len(clip), len(wave))
    out[:kept] = clip[:kept]
    return out, kept
