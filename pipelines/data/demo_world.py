"""The bundled demo world: coloured shapes on a 3x3 grid, described in three modalities.

Every sample has ground truth that ties the modalities together:
- image: one or two shapes by default (`shape_counts` sets how often each count appears, up
  to three) - circle, square, triangle, diamond - in six colours, each in its own cell of a
  3x3 grid, on a noisy background;
- text: a caption naming each shape's colour, kind and position, in reading order;
- audio: one time slot per shape, in the same reading order; the shape's colour is a tone
  (one pitch per colour), its kind is a chime sounding with that tone (one high pitch per
  kind) played as a rhythm (1-4 pulses), its grid cell is a low drone (one pitch per cell).
  So audio<->text and audio<->image retrieval are learnable;
- json: the objects plus one question/answer pair about colour, shape, count or position.

Why one or two shapes by default: the demo must be learnt from random weights in under ten
minutes on two CPU cores (retrieval recall@1 >= 0.8 among 500+ candidates). With up to three
shapes the model has to bind nine attributes per scene and plateaued near 0.7; and identical
scenes are indistinguishable, so one-shape scenes (216 possible) put a ceiling on recall@1:
among the demo's ~680 test images, no model can score above 0.87 with a third of them, 0.91
with a quarter, 0.97 with a tenth (tests/pipelines/data/test_demo_world.py computes it). Single
shapes are therefore rare (10%), and shapes fill most of their cell (a model that saw 30k
samples still told shapes apart at chance when they were 12-17 px wide, while colour and
position were learnt).

Why a chime per kind: colour is a pitch and position a drone, each a fixed band of the
spectrum; kind was a rhythm only (1-4 pulses, each kind sounding 60% of its slot), which an
encoder reads only by counting onsets across frames. With the chime every attribute can be
read from a single spectrogram frame. In the 9-minute demo, captions from audio name the kind
right 80% of the time with the chime (measured after the fusion-init fix in
`model/multimodal.py`; the rhythm-only world was not re-measured after that fix).

Some samples lack their image or audio on purpose, so balancing and missing-modality
training have something to do. Each sample depends only on (seed, index): the world does not
change with how it is split into parts.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from pipelines.config.ingest import SHAPE_COUNTS  # probability of a scene with 1, 2 (, 3) shapes

COLOURS = {
    "red": (215, 38, 38),
    "orange": (240, 135, 20),
    "yellow": (230, 205, 25),
    "green": (35, 160, 60),
    "blue": (40, 75, 215),
    "purple": (135, 45, 175),
}
# One musical pitch per colour (C5 E5 G5 B5 D6 F6): well apart on a mel scale.
COLOUR_TONE_HZ = {"red": 523.3, "orange": 659.3, "yellow": 784.0, "green": 987.8, "blue": 1174.7, "purple": 1396.9}
SHAPES = ("circle", "square", "triangle", "diamond")
SHAPE_PULSES = {"circle": 1, "square": 2, "triangle": 3, "diamond": 4}
# A chime per kind, well above every colour tone and 3+ mel bands apart (40 bands to 8 kHz).
SHAPE_CHIME_HZ = {"circle": 2600.0, "square": 3300.0, "triangle": 4200.0, "diamond": 5300.0}
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)  # row-major: cell index = 3 * row + col
# A low drone per grid cell, 40 Hz apart: below every colour tone.
POSITION_DRONE_HZ = tuple(150.0 + 40.0 * cell for cell in range(9))
POSITION_PHRASES = {
    "top left": "in the top left corner",
    "top": "at the top",
    "top right": "in the top right corner",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left corner",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
COUNT_WORDS = ("zero", "one", "two", "three")
CAPTION_TEMPLATES = ("{objects}.", "there is {objects}.", "a picture of {objects}.", "{count} {noun}: {objects}.")
ANSWERS = tuple(COLOURS) + SHAPES + COUNT_WORDS[1:] + POSITIONS
# One shape as a caption names it (`Shape.phrase`): what evaluation parses scenes back from.
SHAPE_PHRASE = re.compile(rf"\ban? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(POSITION_PHRASES.values())})")
PHRASE_POSITIONS = {phrase: position for position, phrase in POSITION_PHRASES.items()}


def parse_caption(text: str) -> tuple[tuple[str, str, str], ...] | None:
    """The (colour, kind, position) of each shape a demo caption names, in its order; None
    for a text that names none (not a demo caption)."""
    found = SHAPE_PHRASE.findall(text.lower())
    return tuple((colour, kind, PHRASE_POSITIONS[phrase]) for colour, kind, phrase in found) or None


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    cell: int

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]

    def phrase(self) -> str:
        article = "an" if self.colour[0] in "aeiou" else "a"
        return f"{article} {self.colour} {self.kind} {POSITION_PHRASES[self.position]}"

    def as_json(self) -> dict:
        return {
            "colour": self.colour,
            "shape": self.kind,
            "position": self.position,
            "row": self.cell // 3,
            "col": self.cell % 3,
        }


@dataclass(frozen=True)
class DemoWorld:
    seed: int = 0
    image_size: int = 64
    image_format: str = "jpg"
    sample_rate: int = 16000
    audio_seconds: float = 1.0
    audio_format: str = "flac"
    missing_image: float = 0.10
    missing_audio: float = 0.15
    shape_counts: tuple[float, ...] = SHAPE_COUNTS

    def key(self, index: int) -> str:
        return f"demo-s{self.seed}-{index:08d}"

    def sample(self, index: int) -> dict:
        """One record in the ingest schema (see `pipelines.data.records`)."""
        rng = np.random.default_rng([self.seed, index])
        shapes = draw_scene(rng, self.shape_counts)
        caption = describe(shapes, rng)
        question, answer, qtype = ask(shapes, rng)
        roll = rng.random()
        has_image = roll >= self.missing_image
        has_audio = not (self.missing_image <= roll < self.missing_image + self.missing_audio)
        meta = {
            "objects": [s.as_json() for s in shapes],
            "question": question,
            "answer": answer,
            "question_type": qtype,
            "source": "demo",
            "seed": self.seed,
            "index": index,
        }
        return {
            "key": self.key(index),
            "source": f"demo:seed={self.seed}",
            "image": encode_image(render_image(shapes, self.image_size, rng), self.image_format) if has_image else None,
            "image_ext": self.image_format if has_image else None,
            "text": caption.encode("utf-8"),
            "audio": encode_audio(
                render_audio(shapes, self.sample_rate, self.audio_seconds, rng, len(self.shape_counts)),
                self.sample_rate,
                self.audio_format,
            )
            if has_audio
            else None,
            "audio_ext": self.audio_format if has_audio else None,
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
            "cls": None,
        }


def draw_scene(rng: np.random.Generator, shape_counts=SHAPE_COUNTS) -> list[Shape]:
    count = 1 + int(rng.choice(len(shape_counts), p=np.asarray(shape_counts) / sum(shape_counts)))
    cells = sorted(rng.choice(9, size=count, replace=False).tolist())  # reading order
    colours = list(COLOURS)
    return [Shape(colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))], cell) for cell in cells]


def describe(shapes: list[Shape], rng: np.random.Generator) -> str:
    phrases = [s.phrase() for s in shapes]
    listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(
        objects=listed, count=COUNT_WORDS[len(shapes)], noun="shape" if len(shapes) == 1 else "shapes"
    )


def ask(shapes: list[Shape], rng: np.random.Generator) -> tuple[str, str, str]:
    """One question whose answer the scene determines uniquely."""
    kinds = [s.kind for s in shapes]
    pairs = [(s.colour, s.kind) for s in shapes]
    options: list[tuple[str, str, str]] = [("how many shapes are there?", COUNT_WORDS[len(shapes)], "count")]
    for s in shapes:
        options.append((f"what shape is {POSITION_PHRASES[s.position]}?", s.kind, "shape"))
        if kinds.count(s.kind) == 1:
            options.append((f"what colour is the {s.kind}?", s.colour, "colour"))
        if pairs.count((s.colour, s.kind)) == 1:
            options.append((f"where is the {s.colour} {s.kind}?", s.position, "position"))
    # Pick the type first so every type is equally common whatever the scene.
    types = sorted({qtype for _, _, qtype in options})
    chosen = types[rng.integers(len(types))]
    candidates = [o for o in options if o[2] == chosen]
    return candidates[rng.integers(len(candidates))]


def render_image(shapes: list[Shape], size: int, rng: np.random.Generator) -> np.ndarray:
    background = tuple(int(v) for v in rng.integers(195, 246, size=3))
    image = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(image)
    cell = size / 3
    for s in shapes:
        row, col = divmod(s.cell, 3)
        # Shapes fill most of their cell: at 64 px a cell is 21 px, and smaller shapes left the
        # model unable to tell a circle from a diamond within the demo's training budget.
        radius = cell * rng.uniform(0.38, 0.46)
        cx = (col + 0.5) * cell + rng.uniform(-0.04, 0.04) * cell
        cy = (row + 0.5) * cell + rng.uniform(-0.04, 0.04) * cell
        fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLOURS[s.colour])
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        if s.kind == "circle":
            pen.ellipse(box, fill=fill)
        elif s.kind == "square":
            pen.rectangle(box, fill=fill)
        elif s.kind == "triangle":
            pen.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=fill)
        else:  # diamond
            pen.polygon([(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)], fill=fill)
    pixels = np.asarray(image, dtype=np.float32) + 6.0 * rng.standard_normal((size, size, 3), dtype=np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render_audio(
    shapes: list[Shape], sample_rate: int, seconds: float, rng: np.random.Generator, slots: int = 3
) -> np.ndarray:
    """One slot per possible shape, so a slot's place in time says which shape it is."""
    total = int(round(sample_rate * seconds))
    slot = total // slots
    wave = 0.02 * rng.standard_normal(total, dtype=np.float32)
    phase = (2 * np.pi / sample_rate) * np.arange(slot, dtype=np.float32)
    for index, s in enumerate(shapes):
        start = index * slot
        drone = (0.25 * rng.uniform(0.8, 1.0)) * np.sin(phase * (POSITION_DRONE_HZ[s.cell] * rng.uniform(0.99, 1.01)))
        tone = (0.5 * rng.uniform(0.7, 1.0)) * np.sin(phase * (COLOUR_TONE_HZ[s.colour] * rng.uniform(0.985, 1.015)))
        tone += (0.2 * rng.uniform(0.8, 1.0)) * np.sin(phase * (SHAPE_CHIME_HZ[s.kind] * rng.uniform(0.99, 1.01)))
        wave[start : start + slot] += (
            fade(slot, sample_rate) * drone + pulse_envelope(slot, SHAPE_PULSES[s.kind], sample_rate) * tone
        )
    return np.clip(wave, -1.0, 1.0)


@lru_cache(maxsize=64)
def pulse_envelope(length: int, pulses: int, sample_rate: int) -> np.ndarray:
    """`pulses` evenly spaced notes, each 60% of its beat, with 5 ms ramps against clicks."""
    envelope = np.zeros(length, dtype=np.float32)
    beat = length // pulses
    note = int(beat * 0.6)
    for p in range(pulses):
        envelope[p * beat : p * beat + note] = fade(note, sample_rate)
    envelope.flags.writeable = False  # cached and shared
    return envelope


@lru_cache(maxsize=64)
def fade(length: int, sample_rate: int) -> np.ndarray:
    ramp = min(length // 2, int(0.005 * sample_rate))
    envelope = np.ones(length, dtype=np.float32)
    if ramp:
        envelope[:ramp] = np.linspace(0, 1, ramp)
        envelope[-ramp:] = np.linspace(1, 0, ramp)
    envelope.flags.writeable = False  # cached and shared
    return envelope


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(
        buffer, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": 90} if fmt == "jpg" else {})
    )
    return buffer.getvalue()


def encode_audio(wave: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave, sample_rate, format=fmt.upper(), subtype="PCM_16")
    return buffer.getvalue()
