"""Survey a user's data before any pipeline runs: which modalities and combinations it has,
image sizes, audio rates and lengths, caption lengths and words, questions. `crossmodal init`
writes a config from it (`pipelines.scaffold`).

It reads the data the way the ingest stage does (the same source listing, the same safe
readers, nothing unpickled), in this process, up to a sample of `limit` samples.
"""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from pipelines.config.ingest import IngestConfig
from pipelines.dag import StageError
from pipelines.data.records import combination
from pipelines.data.wds_reader import Rejected
from pipelines.errors import UserError
from pipelines.stages.ingest import SHARD_SUFFIXES, plan_units, unit_samples


class SurveyError(UserError):
    """The data cannot be surveyed (missing, empty, unknown layout); a one-line message."""


@dataclass
class Survey:
    source: str  # demo | folder | jsonl | shards
    path: str
    samples: int = 0  # samples read
    total: int = 0  # samples in the data set (estimated for shards from the shards read)
    rejected: Counter = field(default_factory=Counter)
    combinations: Counter = field(default_factory=Counter)
    image_sides: list[int] = field(default_factory=list)  # the short side of each image
    audio_rates: Counter = field(default_factory=Counter)
    audio_seconds: list[float] = field(default_factory=list)
    caption_words: list[int] = field(default_factory=list)
    words: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)  # answers of samples with a question

    def count(self, modality: str) -> int:
        return sum(n for combo, n in self.combinations.items() if modality in combo.split("+"))


def detect_source(path: Path) -> str:
    if path.is_file():
        if path.name.endswith(SHARD_SUFFIXES):
            return "shards"
        if path.suffix in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        raise SurveyError(f"{path}: not a JSONL manifest (.jsonl) or a shard (.tar, .tar.gz, .tgz)")
    if not path.is_dir():
        try:
            path.stat()
        except FileNotFoundError:
            raise SurveyError(f"{path}: no such file or folder") from None
        except OSError as err:  # there, but not to be read: a link loop, a folder of another user
            raise SurveyError(f"{path}: cannot read it ({err.strerror})") from None
        raise SurveyError(f"{path}: not a file or folder")
    if any(p.name.endswith(SHARD_SUFFIXES) for p in path.rglob("*")):
        return "shards"
    return "folder"


def survey(path: str | Path, limit: int = 2000) -> Survey:
    """Read up to `limit` samples of the data at `path` and measure them."""
    path = Path(path)
    source = detect_source(path)
    cfg = IngestConfig(source=source, path=str(path))
    try:
        units, rejected = plan_units(cfg)
    except StageError as err:  # the stage's own one-line input errors
        raise SurveyError(str(err)) from None
    found = Survey(source, str(path), rejected=Counter(r["reason"] for r in rejected))
    listed = sum(len(u.items) for u in units)
    read_units = 0
    for unit in units:
        read_units += 1
        for item in unit_samples(unit, cfg):
            if isinstance(item, Rejected):
                found.rejected[item.reason] += 1
            else:
                measure(item, found)
            if found.samples >= limit:
                break
        if found.samples >= limit:
            break
    if not found.samples:
        raise SurveyError(f"{path}: no usable sample found ({dict(found.rejected) or 'the data is empty'})")
    # Folders and manifests list every sample; shards are counted from those read.
    found.total = listed if source != "shards" else round(found.samples * len(units) / read_units)
    return found


def measure(record: dict, found: Survey) -> None:
    found.samples += 1
    found.combinations[combination(record)] += 1
    if record.get("image"):
        try:
            with Image.open(io.BytesIO(record["image"])) as image:
                found.image_sides.append(min(image.size))
        except (OSError, ValueError):
            pass  # prepare quarantines it, with its reason
    if record.get("audio"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info = sf.info(io.BytesIO(record["audio"]))
            found.audio_rates[int(info.samplerate)] += 1
            found.audio_seconds.append(float(info.duration))
        except (RuntimeError, ValueError, TypeError):
            pass
    if record.get("text"):
        text = record["text"].decode("utf-8", errors="replace").lower().split()
        found.caption_words.append(len(text))
        found.words.update(text)
    if record.get("json"):
        try:
            meta = json.loads(record["json"])
        except ValueError:
            return
        if isinstance(meta, dict) and meta.get("question") and meta.get("answer"):
            found.answers[str(meta["answer"]).strip()] += 1


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0
