"""What a prepared data set holds, and the settings that cannot work with it.

The prepare stage profiles every usable sample once (modality combinations, questions, clip
lengths, caption lengths) and writes `profile.json`; it rides in the dataset spec, so the
train and evaluate stages check their own settings against the data before they spend
minutes on it. A setting that cannot work is a warning naming its key, stated once, and the
run goes on without that part (a loss with no sample to apply to adds nothing, say).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

MODALITIES = ("image", "text", "audio")


@dataclass(frozen=True)
class Finding:
    """A setting that does not fit the data: its dotted key and why, on one line."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"

    def as_row(self) -> dict:
        return {"key": self.key, "message": self.message}


def data_profile(rows: list[dict]) -> dict:
    """Facts of the usable samples (dicts with split, combo, caption, question, answer,
    audio_seconds): counts per split and per combination, questions, clip and caption lengths."""
    train = [r for r in rows if r["split"] == "train"]
    seconds = np.array([r["audio_seconds"] for r in train if "audio" in r["combo"].split("+")], dtype=np.float64)
    words = np.array([len(r["caption"].split()) for r in train if r["caption"]], dtype=np.float64)
    combos = Counter(r["combo"] for r in train)
    return {
        "samples": dict(Counter(r["split"] for r in rows)),
        "combinations": dict(sorted(combos.items(), key=lambda item: -item[1])),
        "modalities": {m: sum(n for c, n in combos.items() if m in c.split("+")) for m in MODALITIES},
        "questions": sum(1 for r in train if r["question"] and r["answer"]),
        "audio_seconds": percentiles(seconds),
        "caption_words": percentiles(words),
    }


def percentiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    return {name: round(float(np.percentile(values, q)), 3) for name, q in (("p50", 50), ("p90", 90), ("max", 100))}


def has_pair(profile: dict, *modalities: str) -> bool:
    """Some train sample has text and at least one of `modalities`."""
    return any("text" in c.split("+") and set(modalities) & set(c.split("+")) for c in profile["combinations"])


def prepare_findings(cfg, profile: dict, negatable: int) -> list[Finding]:
    """The prepare section against its data; `negatable`: train captions the negative-caption
    table can change (0 when negatives are off)."""
    found = []
    target = cfg.balance.target or {}
    absent = [combo for combo in target if not profile["combinations"].get(combo)]
    if absent:
        has = ", ".join(f"{c} {n}" for c, n in profile["combinations"].items())
        found.append(
            Finding(
                "prepare.balance.target",
                f"names {', '.join(absent)}, which the train split does not "
                f"have (it has {has}): its share goes to the others",
            )
        )
    captions = sum(n for c, n in profile["combinations"].items() if "text" in c.split("+"))
    if cfg.augment.negatives.p > 0 and captions and negatable == 0:
        found.append(
            Finding(
                "prepare.augment.negatives.words_file",
                f"none of its words occur in the {captions} train captions: no negative captions are made",
            )
        )
    clips = profile["audio_seconds"]
    if clips and clips["p50"] > cfg.max_audio_seconds:
        found.append(
            Finding(
                "prepare.max_audio_seconds",
                f"{cfg.max_audio_seconds:g} s crops most clips (median "
                f"{clips['p50']:g} s, 90th percentile {clips['p90']:g} s)",
            )
        )
    return found


# loss -> (what it needs, test on the profile)
LOSS_NEEDS = {
    "contrastive": ("samples with two modalities", lambda p: any("+" in c for c in p["combinations"])),
    "matching": ("text with an image or audio", lambda p: has_pair(p, "image", "audio")),
    "masked_text": ("text", lambda p: p["modalities"]["text"] > 0),
    "masked_image": ("images", lambda p: p["modalities"]["image"] > 0),
    "masked_audio": ("audio", lambda p: p["modalities"]["audio"] > 0),
    "caption": ("text with an image or audio", lambda p: has_pair(p, "image", "audio")),
    "answer": ("questions with answers", lambda p: p["questions"] > 0),
    "vqa": ("questions with answers", lambda p: p["questions"] > 0),
}


def train_findings(losses, profile: dict) -> list[Finding]:
    """Task weights for tasks the data has no sample for: those tasks are not trained."""
    weights = losses.model_dump()
    return [
        Finding(f"train.losses.{name}", f"{weights[name]:g}, but the train split has no {needs}: it is not trained")
        for name, (needs, present) in LOSS_NEEDS.items()
        if weights[name] > 0 and not present(profile)
    ]


def skipped_parts(modalities: dict[str, int], questions: int, split: str) -> list[str]:
    """What an evaluation of a split with these counts cannot score, one line each."""
    notes = [
        f"no {m} in the {split} split: retrieval to and from {m}"
        + (" and captions from it" if m != "text" else "")
        + " skipped"
        for m in MODALITIES
        if not modalities.get(m)
    ]
    if not questions:
        notes.append(f"no questions in the {split} split: VQA skipped")
    return notes
