"""The final model as an MLflow pyfunc model: embeddings, captions and answers for rows of text,
base64 image files and base64 audio files, decoded and filtered exactly as the applications do
(it is `pipelines.apps.api.CrossModal` underneath).

Logged as "models from code" (`registry.register_model`): this file is the model's code and the
model folder (safetensors or ONNX files, config.json, tokenizer.json) its one artifact, so
nothing is pickled. Request rows (a DataFrame, or a list of dicts):

    task      "embed" (default) | "caption" | "answer"
    text      a text to embed
    image     base64 of an image file (PNG, JPEG, WebP, ...; a data: URL prefix is accepted)
    audio     base64 of an audio file (WAV, FLAC, ...)
    question  the question, for "answer" (about the image)

One response row per request row, every column present (None where not asked):
text_embedding / image_embedding / audio_embedding (lists of floats, for what was given, task
embed), caption (task caption, from the image and/or audio given), answer and score (task answer),
blocked and reason (the content filter's verdict on the caption or answer). Params: beam_size,
max_len (captions).

A malformed row (bad base64, an undecodable file, a caption without image or audio, an unknown
task) raises MlflowException(INVALID_PARAMETER_VALUE) with a one-line message naming the row:
the scoring server answers 400 and its JSON body carries that line as `reason`.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

TASKS = ("embed", "caption", "answer")
INPUT_COLUMNS = ("task", "text", "image", "audio", "question")
OUTPUT_COLUMNS = (
    "task",
    "text_embedding",
    "image_embedding",
    "audio_embedding",
    "caption",
    "answer",
    "score",
    "blocked",
    "reason",
)
MAX_FILE_BYTES = 32 << 20  # one image or audio file, decoded
EMBED_BATCH = 64
BATCH_ARGUMENT = {"text": "texts", "image": "images", "audio": "audio"}  # CrossModal.batch's keywords
LIMITS = {"beam_size": (1, 8), "max_len": (1, 128)}
DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+;base64,", re.IGNORECASE)


def signature() -> mlflow.models.ModelSignature:
    inputs = Schema([ColSpec(DataType.string, name, required=False) for name in INPUT_COLUMNS])
    floats = Array(DataType.float)
    outputs = Schema(
        [
            ColSpec(DataType.string, "task"),
            ColSpec(floats, "text_embedding", required=False),
            ColSpec(floats, "image_embedding", required=False),
            ColSpec(floats, "audio_embedding", required=False),
            ColSpec(DataType.string, "caption", required=False),
            ColSpec(DataType.string, "answer", required=False),
            ColSpec(DataType.double, "score", required=False),
            ColSpec(DataType.boolean, "blocked", required=False),
            ColSpec(DataType.string, "reason", required=False),
        ]
    )
    params = ParamSchema([ParamSpec("beam_size", DataType.long, 3), ParamSpec("max_len", DataType.long, 32)])
    return mlflow.models.ModelSignature(inputs=inputs, outputs=outputs, params=params)


def example_files(image_size: int = 16, sample_rate: int = 8000, seconds: float = 0.1) -> tuple[bytes, bytes]:
    """(a small PNG, a short WAV): a red square on white, a 440 Hz tone."""
    import soundfile as sf
    from PIL import Image

    pixels = np.full((image_size, image_size, 3), 255, dtype=np.uint8)
    pixels[image_size // 4 : 3 * image_size // 4, image_size // 4 : 3 * image_size // 4] = (220, 30, 30)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    wav = io.BytesIO()
    sf.write(wav, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return png.getvalue(), wav.getvalue()


def input_example() -> pd.DataFrame:
    """Three rows: a text, a base64 PNG and a base64 WAV, to embed."""
    png, wav = (base64.b64encode(data).decode("ascii") for data in example_files())
    return pd.DataFrame(
        [
            {"task": "embed", "text": "a red square", "image": None, "audio": None, "question": None},
            {"task": "embed", "text": None, "image": png, "audio": None, "question": None},
            {"task": "embed", "text": None, "image": None, "audio": wav, "question": None},
        ],
        columns=list(INPUT_COLUMNS),
    )


class BadRow(MlflowException):
    """A malformed request row: 400 from the scoring server, its one-line reason in the body."""

    def __init__(self, reason: str):
        reason = " ".join(str(reason).split())  # one line, whatever the detail held
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE, reason=reason)


class CrossModalPyfunc(mlflow.pyfunc.PythonModel):
    """Holds no tensors until `load_context` loads the folder artifact (`model`)."""

    def load_context(self, context) -> None:
        from pipelines.apps.api import CrossModal
        from pipelines.compression.folder import load_any
        from pipelines.inference.safety import SafetyConfig, SafetyFilter

        folder = Path(context.artifacts["model"])
        safety = (context.model_config or {}).get("safety")
        self.app = CrossModal(load_any(folder), folder, SafetyFilter(SafetyConfig(**(safety or {}))))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from pipelines.errors import UserError

        settings = generation_settings(params)
        rows = records(model_input)
        try:
            return pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in self.answer_rows(rows, settings).items()})
        except UserError as err:  # the apps' InputError: a bad file, an empty question
            raise BadRow(str(err)) from None

    def answer_rows(self, rows: list[dict], settings: dict) -> dict[str, list]:
        from pipelines.errors import UserError
        from pipelines.inference import predict

        app = self.app
        parsed = [parse_row(i, row, app) for i, row in enumerate(rows)]
        out = {c: [None] * len(parsed) for c in OUTPUT_COLUMNS}
        out["task"] = [p["task"] for p in parsed]
        # Embeddings: one batch per modality over every row that gave it.
        for modality in ("text", "image", "audio"):
            wanted = [i for i, p in enumerate(parsed) if p["task"] == "embed" and p[modality] is not None]
            for start in range(0, len(wanted), EMBED_BATCH):
                chunk = wanted[start : start + EMBED_BATCH]
                batch = app.batch(**{BATCH_ARGUMENT[modality]: [parsed[i][modality] for i in chunk]})
                vectors = predict.embed(app.model, batch)[modality]
                for i, vector in zip(chunk, vectors):
                    out[f"{modality}_embedding"][i] = [float(x) for x in vector]
        for i, p in enumerate(parsed):
            try:
                if p["task"] == "caption":
                    result = app.caption_decoded(p["image"], p["audio"], **settings)
                    out["caption"][i] = result.text
                elif p["task"] == "answer":
                    result = app.answer_decoded(p["image"], p["question"])
                    out["answer"][i], out["score"][i] = result.text, result.score
                else:
                    continue
            except UserError as err:  # e.g. a model trained without answers
                raise BadRow(f"row {i}: {p['task']}: {err}") from None
            out["blocked"][i], out["reason"][i] = result.blocked, result.reason or None
        return out


def generation_settings(params: dict | None) -> dict:
    settings = {"beam_size": 3, "max_len": 32}
    for name, value in (params or {}).items():
        if name not in LIMITS:
            continue  # the signature's params schema has already refused unknown names in serving
        low, high = LIMITS[name]
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
            raise BadRow(f"params: {name} must be an integer in [{low}, {high}], got {value!r}")
        settings[name] = int(value)
    return settings


def records(model_input) -> list[dict]:
    """Request rows as dicts, from a DataFrame, a list of dicts or one dict."""
    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        model_input = [model_input]
    if isinstance(model_input, list | tuple) and all(isinstance(r, dict) for r in model_input):
        return list(model_input)
    raise BadRow(f"expected rows with columns {', '.join(INPUT_COLUMNS)}, got {type(model_input).__name__}")


def parse_row(index: int, row: dict, app) -> dict:
    """The row's task and decoded inputs; BadRow naming the row and the field for anything wrong."""
    where = f"row {index}"
    values = {name: present(where, name, row.get(name)) for name in INPUT_COLUMNS}
    task = (values["task"] or "embed").lower()
    if task not in TASKS:
        raise BadRow(f"{where}: task: unknown task {values['task']!r} (one of {', '.join(TASKS)})")
    image = audio = None
    if values["image"] is not None:
        image = app.image_from_bytes(unbase64(f"{where}: image", values["image"]), f"{where}: image")
    if values["audio"] is not None:
        audio = app.audio_from_bytes(unbase64(f"{where}: audio", values["audio"]), f"{where}: audio")
    text, question = values["text"], values["question"]
    if task == "embed" and text is None and image is None and audio is None:
        raise BadRow(f"{where}: embed: nothing to embed (give text, image or audio)")
    if task == "caption" and image is None and audio is None:
        raise BadRow(f"{where}: caption: needs an image or audio (base64 of the file)")
    if task == "answer" and (image is None or question is None):
        raise BadRow(f"{where}: answer: needs an image (base64 of the file) and a question")
    return {"task": task, "text": text, "image": image, "audio": audio, "question": question}


def present(where: str, name: str, value) -> str | None:
    """The field's text, or None when absent (missing, null, NaN or blank)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if not isinstance(value, str):
        raise BadRow(f"{where}: {name}: expected a string, got {type(value).__name__}")
    return value.strip() or None


def unbase64(where: str, value: str) -> bytes:
    encoded = DATA_URL.sub("", value, count=1)
    encoded = "".join(encoded.split())  # line breaks of wrapped base64
    if len(encoded) > MAX_FILE_BYTES * 4 // 3 + 4:
        raise BadRow(f"{where}: over {MAX_FILE_BYTES >> 20} MiB")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadRow(f"{where}: not valid base64") from None
    if not data:
        raise BadRow(f"{where}: empty file")
    return data


mlflow.models.set_model(CrossModalPyfunc())
