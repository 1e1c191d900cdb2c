"""The prepare section: decoding limits, the tokenizer's size, augmentation, modality balancing."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from pipelines.config.base import Strict
from pipelines.config.ingest import DEFAULT_MEMBER_MB
from pipelines.config.reference import model_reference

# The word tables shipped with the project (synonyms, contrast words for negative captions).
DATA_TABLES = Path(__file__).resolve().parent.parent / "data"
COMBINATIONS = ("image+text+audio", "image+text", "text+audio", "image+audio", "image", "text", "audio")


class ImageAugment(Strict):
    p_crop: float = Field(0.5, ge=0, le=1)
    crop_scale: tuple[float, float] = (0.85, 1.0)
    p_rotate: float = Field(0.3, ge=0, le=1)
    max_rotate_degrees: float = Field(8.0, ge=0, le=45)
    p_color: float = Field(0.5, ge=0, le=1)
    p_blur: float = Field(0.1, ge=0, le=1)
    p_flip: float = Field(0.5, ge=0, le=1)


class TextAugment(Strict):
    p_swap: float = Field(0.1, ge=0, le=1)
    p_delete: float = Field(0.05, ge=0, le=1)
    p_keyboard: float = Field(0.05, ge=0, le=1)
    p_ocr: float = Field(0.05, ge=0, le=1)
    p_spelling: float = Field(0.05, ge=0, le=1)
    p_synonym: float = Field(0.3, ge=0, le=1)
    synonyms_file: str | None = Field(
        None, description="one group of interchangeable words per line; null: the shipped table"
    )
    wordnet_data: str | None = Field(
        None, description="an NLTK data folder with wordnet + the POS tagger: adds WordNet synonyms"
    )


class AudioAugment(Strict):
    p_noise: float = Field(0.3, ge=0, le=1)
    p_shift: float = Field(0.3, ge=0, le=1)
    max_shift_seconds: float = Field(0.02, ge=0, le=1)
    p_loudness: float = Field(0.3, ge=0, le=1)
    loudness: tuple[float, float] = (0.7, 1.3)
    p_mask: float = Field(0.1, ge=0, le=1)
    mask_coverage: float = Field(0.05, ge=0, le=1)
    p_speed: float = Field(0.1, ge=0, le=1)
    speed: tuple[float, float] = (0.97, 1.03)
    p_pitch: float = Field(0.1, ge=0, le=1)
    pitch_semitones: tuple[float, float] = (-0.3, 0.3)


class NegativeCaptions(Strict):
    """Hard negative captions (NegCLIP, Yuksekgonul et al. 2023): the sample's own text with one
    word swapped for another of its group (a colour for another colour, "left" for "right"), so
    it is false for this sample yet differs by one attribute. Contrastive training scores them
    as extra negatives for the image and audio; in-batch negatives alone rarely differ by one
    attribute, so a model can reach a low loss while ignoring the hardest one (shape, here)."""

    p: float = Field(0.0, ge=0, le=1, description="share of training samples given negative captions")
    count: int = Field(1, ge=1, le=8, description="negative captions per sample (distinct where the text allows)")
    words_file: str | None = Field(
        None,
        description="one group of mutually exclusive words per line; a path, or the name of a "
        "table in pipelines/data/; null: contrast_words.txt",
    )

    @field_validator("words_file")
    @classmethod
    def _has_groups(cls, path: str | None) -> str | None:
        """Checked when the config loads (not in a Ray worker mid-run). A shipped table is kept
        by its name and found where the code runs (another checkout, a Ray job's working_dir,
        another node); the user's own file is made absolute so the workers read the file the
        user meant whatever their working directory."""
        if path is None:
            return None
        resolved = Path(path).expanduser().resolve()
        if not resolved.is_file() and Path(path).name == path:
            resolved = DATA_TABLES / path  # a bare name also finds a table shipped there
        if not resolved.is_file():
            raise ValueError(f"{path}: no such file")
        if not word_groups(resolved):
            raise ValueError(f"{path}: no line with two or more words to swap")
        return resolved.name if resolved.parent == DATA_TABLES else str(resolved)


class AugmentConfig(Strict):
    image: ImageAugment = ImageAugment()
    text: TextAugment = TextAugment()
    audio: AudioAugment = AudioAugment()
    negatives: NegativeCaptions = NegativeCaptions()


def table_path(path: str | Path) -> Path:
    """A word table's file here: a bare name is a table shipped in pipelines/data/."""
    return DATA_TABLES / path if Path(path).name == str(path) else Path(path)


def word_groups(path: str | Path) -> list[list[str]]:
    lines = table_path(path).read_text(encoding="utf-8").splitlines()
    return [line.split() for line in lines if line.strip() and not line.startswith("#") and len(line.split()) > 1]


class BalanceConfig(Strict):
    target: dict[str, float] | None = Field(None, description="combination -> share of the stream; null: no resampling")
    loss_weights: Literal["none", "inverse_frequency"] | dict[str, float] = "none"

    @field_validator("target")
    @classmethod
    def _target(cls, target):
        if target is None:
            return None
        for combo, share in target.items():
            if combo not in COMBINATIONS:
                raise ValueError(f"unknown combination '{combo}' (one of {', '.join(COMBINATIONS)})")
            if not 0 <= share <= 1:
                raise ValueError(f"share of '{combo}' must be in [0, 1], got {share}")
        if sum(target.values()) > 1 + 1e-6:
            raise ValueError(f"target shares sum to {sum(target.values()):g} > 1")
        return target


class PrepareConfig(Strict):
    seed: int = Field(0, ge=0)
    image_size: int = Field(64, ge=16, le=1024, description="the model's input size")
    sample_rate: int = Field(16000, ge=4000, le=48000)
    max_audio_seconds: float = Field(1.0, gt=0, le=60)
    max_image_pixels: int = Field(40_000_000, ge=1)
    min_image_side: int = Field(
        16, ge=1, le=1024, description="images with a shorter side are quarantined (image_too_small)"
    )
    max_text_chars: int = Field(512, ge=1)
    max_text_len: int = Field(48, ge=4, le=1024, description="tokens, <bos> and <eos> included")
    # The reader's member limit is ingest's: the pipeline fills it from ingest.max_member_mb.
    max_member_mb: float | None = Field(None, gt=0, description="from ingest.max_member_mb")
    vocab_size: int = Field(1024, ge=300, le=200_000)
    max_answers: int = Field(1000, ge=1)
    # Fine-tuning needs the token ids and answer indices the model was trained with.
    vocabulary_from: str | None = Field(
        None,
        description="from train.init_from: take that model's tokenizer and answer list instead of learning them "
        "(vocab_size and max_answers then do not apply); train answers not in its list are out of vocabulary",
    )
    augment: AugmentConfig = AugmentConfig()
    balance: BalanceConfig = BalanceConfig()
    materialize: bool = False
    data_cpus: float = Field(2.0, gt=0, description="CPUs Ray Data may hold, so train workers keep theirs")
    batch_size: int = Field(32, ge=1)
    preview_samples: int = Field(8, ge=0, le=32)

    @field_validator("vocabulary_from")
    @classmethod
    def _reference(cls, ref: str | None) -> str | None:
        return model_reference(ref)

    @property
    def member_limit(self) -> int:
        return int((self.max_member_mb or DEFAULT_MEMBER_MB) * 2**20)

    def model_sizes(self) -> dict:
        """The ModelConfig fields this section fixes (the largest vocabulary and answer set the
        data may give; the train stage uses what the prepared data really has)."""
        return {
            "vocab_size": self.vocab_size,
            "num_answers": self.max_answers,
            "max_text_len": self.max_text_len,
            "image_size": self.image_size,
            "sample_rate": self.sample_rate,
            "audio_seconds": self.max_audio_seconds,
        }
