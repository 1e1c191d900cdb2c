"""The Python API of the applications: embed, caption, answer (search lives in
`pipelines.apps.index`). Every generated text passes the content filter before it is returned.

    from pipelines.apps.api import CrossModal
    app = CrossModal.load("models:/crossmodal@champion")
    app.caption("cat.jpg").text
    app.answer("scene.png", "what colour is the circle?").text

Files are decoded exactly as the prepare stage decodes training data (same resize, resampling
and limits), so a model sees at inference what it saw in training.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from model.io import SavedModel
from pipelines.data.collate import IMAGE_MEAN, IMAGE_STD
from pipelines.data.decode import DecodeSettings, Unusable, decode_audio, decode_image
from pipelines.errors import UserError
from pipelines.inference import predict
from pipelines.inference.resolve import load_model
from pipelines.inference.safety import SafetyConfig, SafetyFilter

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif"}
WEIGHT_SUFFIXES = {".safetensors", ".onnx", ".json", ".data", ".bin"}


class InputError(UserError):
    """A bad file, question or query; the message is one line naming it."""


@dataclass(frozen=True)
class Generated:
    text: str  # what may be shown (the filter's replacement when blocked)
    blocked: bool = False
    reason: str = ""  # why the content filter blocked it
    score: float | None = None  # answer probability
    source: str = ""  # the modality it was generated from


class CrossModal:
    def __init__(self, saved: SavedModel, folder: Path, safety: SafetyFilter | None = None):
        self.saved, self.folder = saved, Path(folder)
        self.model, self.tokenizer = saved.model.eval(), saved.tokenizer
        self.safety = safety or SafetyFilter()
        cfg = self.model.cfg
        self.settings = DecodeSettings(
            image_size=cfg.image_size, sample_rate=cfg.sample_rate, max_audio_seconds=cfg.audio_seconds
        )

    @classmethod
    def load(
        cls, ref: str, tracking_uri: str | None = None, safety: SafetyConfig | None = None, device: str = "cpu"
    ) -> CrossModal:
        saved, folder = load_model(ref, tracking_uri, device)
        return cls(saved, folder, SafetyFilter(safety or SafetyConfig()))

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the weights (hashed once): an index records it, so a query embedded by
        another model is refused."""
        digest = hashlib.sha256()
        # A compressed folder has other weight files (quantized.json names them): all of them count.
        files = [self.folder / "model.safetensors"]
        if not files[0].is_file():
            files = sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        for path in files:
            with open(path, "rb") as weights:
                for chunk in iter(lambda: weights.read(1 << 20), b""):
                    digest.update(chunk)
        return digest.hexdigest()[:16]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- inputs ------------------------------------------------------------------------------
    def read_image(self, path: str | Path) -> np.ndarray:
        return self.image_from_bytes(read_file(path), str(path))

    def read_audio(self, path: str | Path) -> tuple[np.ndarray, int]:
        return self.audio_from_bytes(read_file(path), str(path))

    def image_from_bytes(self, data: bytes, name: str = "image") -> np.ndarray:
        """The bytes of an image file, decoded as training decoded them; `name` labels errors."""
        try:
            return decode_image(data, self.settings, name)
        except Unusable as err:
            raise InputError(f"{name}: not a usable image ({err.reason}: {one_line(err.detail)})") from None

    def audio_from_bytes(self, data: bytes, name: str = "audio") -> tuple[np.ndarray, int]:
        """(wave, valid length) of the bytes of an audio file, decoded as training decoded them."""
        try:
            return decode_audio(data, self.settings, name)
        except Unusable as err:
            raise InputError(f"{name}: not a usable audio file ({err.reason}: {one_line(err.detail)})") from None

    def modality_of(self, path: str | Path) -> str:
        suffix = Path(path).suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            return "image"
        if suffix in AUDIO_SUFFIXES:
            return "audio"
        read_file(path)  # a missing file is reported as missing, not as an unknown type
        raise InputError(
            f"{path}: not an image or audio file (known: {', '.join(sorted(IMAGE_SUFFIXES | AUDIO_SUFFIXES))})"
        )

    def batch(
        self,
        texts: list[str] | None = None,
        images: list[np.ndarray] | None = None,
        audio: list[tuple[np.ndarray, int]] | None = None,
        questions: list[str] | None = None,
    ) -> dict:
        """A model batch from decoded inputs (one modality list or aligned lists)."""
        size = len(next(x for x in (texts, images, audio, questions) if x is not None))
        out: dict[str, torch.Tensor] = {"weight": torch.ones(size)}
        length = self.model.cfg.max_text_len
        if texts is not None:
            out["text_ids"], out["text_mask"] = self.tokenizer.batch(texts, length)
        if questions is not None:
            out["question_ids"], out["question_mask"] = self.tokenizer.batch(questions, length)
        if images is not None:
            pixels = torch.as_tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
            out["image"] = (pixels - IMAGE_MEAN) / IMAGE_STD
        if audio is not None:
            out["audio"] = torch.as_tensor(np.stack([wave for wave, _ in audio]))
            lengths = torch.tensor([valid for _, valid in audio])
            out["audio_mask"] = torch.arange(out["audio"].shape[1])[None, :] < lengths[:, None]
        for m, given in (("text", texts), ("image", images), ("audio", audio)):
            out[f"has_{m}"] = torch.full((size,), given is not None)
        return {k: v.to(self.device) for k, v in out.items()}

    # -- embeddings --------------------------------------------------------------------------
    def embed_text(self, texts: list[str]) -> np.ndarray:
        if not texts or any(not t.strip() for t in texts):
            raise InputError("text query: empty text")
        return predict.embed(self.model, self.batch(texts=texts))["text"]

    def embed_file(self, path: str | Path) -> tuple[str, np.ndarray]:
        """(modality, embedding) of one image or audio file."""
        modality = self.modality_of(path)
        batch = (
            self.batch(images=[self.read_image(path)])
            if modality == "image"
            else self.batch(audio=[self.read_audio(path)])
        )
        return modality, predict.embed(self.model, batch)[modality][0]

    # -- generation --------------------------------------------------------------------------
    def caption(self, path: str | Path, beam_size: int = 3, max_len: int = 32) -> Generated:
        modality = self.modality_of(path)
        if modality == "image":
            return self.caption_decoded(image=self.read_image(path), beam_size=beam_size, max_len=max_len)
        return self.caption_decoded(audio=self.read_audio(path), beam_size=beam_size, max_len=max_len)

    def caption_decoded(
        self,
        image: np.ndarray | None = None,
        audio: tuple[np.ndarray, int] | None = None,
        beam_size: int = 3,
        max_len: int = 32,
    ) -> Generated:
        """The caption of one decoded image and/or audio clip (both: captioned from both)."""
        context = tuple(m for m, given in (("image", image), ("audio", audio)) if given is not None)
        if not context:
            raise InputError("caption: needs an image or an audio file")
        batch = self.batch(images=None if image is None else [image], audio=None if audio is None else [audio])
        texts, _ = predict.captions(self.model, self.tokenizer, batch, context, beam_size, max_len)
        return self.filtered(texts[0], source="+".join(context))

    def answer(self, image: str | Path, question: str) -> Generated:
        self.check_question(question)
        return self.answer_decoded(self.read_image(image), question)

    def answer_decoded(self, image: np.ndarray, question: str) -> Generated:
        """The answer to a question about one decoded image."""
        self.check_question(question)
        batch = self.batch(images=[image], questions=[question.strip()])
        names, scores, _ = predict.answers(self.model, self.saved.answers, batch, ("image",))
        return self.filtered(names[0], score=float(scores[0]), source="image")

    def check_question(self, question: str) -> None:
        if not question or not question.strip():
            raise InputError("question: empty question")
        if not self.saved.answers:
            raise InputError(f"{self.folder}: this model was trained without answers (no VQA head labels)")

    def filtered(self, text: str, **details) -> Generated:
        verdict = self.safety.check(text)
        return Generated(verdict.text, verdict.blocked, verdict.reason, **details)


def read_file(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    data = path.read_bytes()
    if not data:
        raise InputError(f"{path}: empty file")
    return data


def one_line(detail: str) -> str:
    """A decoder's message as one line, without the repr of the in-memory file PIL names."""
    lines = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(detail)).strip().splitlines()
    return lines[0] if lines else ""
