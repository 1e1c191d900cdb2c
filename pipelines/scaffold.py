"""`crossmodal init`: a commented config that fits the surveyed data (pipelines.survey).

Every value it derives says where it came from in a comment: the modalities and combinations
there are (balance targets, the losses for what is there and off for what is not), the image
size, the audio rate and crop length, text lengths and the vocabulary, the split fractions that
give val and test enough samples. `pipelines/configs/own_data.yaml` is the same layout,
documented, for a data set of a few thousand samples.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from pipelines.survey import Survey, percentile

IMAGE_SIZES = (32, 48, 64, 96, 128)  # a CPU demo-sized model; a GPU cluster uses 224 (nightly.yaml)
MODEL_RATE = 16000


def split_fractions(total: int) -> dict[str, float]:
    """Val and test of about 60 and 120 samples where the data allows, 3-15% and 5-20% of it;
    under 60 samples no validation split, and a quarter for the test split."""
    if total < 60:
        return {"train": 0.75, "test": 0.25}
    test = min(0.2, max(0.05, 120 / max(total, 1)))
    val = min(0.15, max(0.03, 60 / max(total, 1)))
    test, val = round(test, 2), round(val, 2)
    return {"train": round(1 - test - val, 2), "val": val, "test": test}


def image_size(sides: list[int]) -> int:
    """The largest model size no bigger than the median image's short side (no upscaling)."""
    median = percentile(sides, 50)
    return max([s for s in IMAGE_SIZES if s <= median] or [IMAGE_SIZES[0]])


def patch_size(size: int) -> int:
    """Conv image tokens of 8-32 pixels, as few as a 3x3 to 5x5 map: fusion cost grows with them."""
    return max(p for p in (8, 16, 32) if size % p == 0 and size // p >= 3)


def audio_seconds(seconds: list[float]) -> float:
    """Crop at the 90th percentile of clip lengths (rounded up to half a second), 1-30 s."""
    return min(30.0, max(1.0, math.ceil(percentile(seconds, 90) * 2) / 2))


def sample_rate(rates) -> int:
    """The most common rate, at most the model's 16 kHz (no point in upsampling 8 kHz speech)."""
    return min(MODEL_RATE, rates.most_common(1)[0][0]) if rates else MODEL_RATE


def text_tokens(words: list[int]) -> int:
    """Room for the 95th-percentile caption: about 1.5 tokens a word, <bos> and <eos>, to 8."""
    return int(min(128, max(16, math.ceil((percentile(words, 95) * 1.5 + 2) / 8) * 8)))


def vocabulary(distinct: int) -> int:
    return int(min(16000, max(300, round(distinct * 1.5 / 64) * 64)))


def micro_batch(train_samples: int, workers: int = 2) -> int:
    """32 per worker, fewer when a worker would not see four full micro-batches an epoch."""
    return int(min(32, max(2, train_samples // (workers * 4))))


def budget_minutes(total: int) -> float:
    """Ten minutes of training for a few thousand samples or more, down to two for a few dozen."""
    return round(min(10.0, max(2.0, total / 300)), 1)


def balance_target(found: Survey) -> dict[str, float]:
    """Equal shares for every combination with at least 1% of the samples: none dominates."""
    kept = [c for c, n in found.combinations.most_common() if n >= 0.01 * found.samples and c != "none"]
    return {c: round(1 / len(kept), 3) for c in kept} if len(kept) > 1 else {}


def render(found: Survey, name: str) -> str:
    """The YAML text of the config, with a comment on every value derived from the data."""
    n, images, audio, texts = found.samples, found.count("image"), found.count("audio"), found.count("text")
    paired = any("text" in c.split("+") and ("image" in c or "audio" in c) for c in found.combinations)
    two_way = any("+" in c for c in found.combinations)
    questions = sum(found.answers.values())
    size = image_size(found.image_sides) if images else 64
    seconds = audio_seconds(found.audio_seconds) if audio else 1.0
    combos = ", ".join(f"{c} {k}" for c, k in found.combinations.most_common())
    splits = split_fractions(found.total)
    held_out = " and ".join(f"{round(found.total * v)} {k}" for k, v in splits.items() if k != "train")
    target = balance_target(found)
    lines = [
        f"# Written by `crossmodal init {found.path}` from {n} of {found.total} samples: {combos}.",
        "# Every value that follows from the data says so; the rest are the project's CPU defaults.",
        f"name: {name}",
        "",
        "storage:",
        f"  root: runs/{name}/storage",
        "mlflow:",
        f"  experiment: {name}",
        "  local_store: runs",
        "ray:",
        "  local_num_cpus: 4              # logical CPUs of a local cluster: more than the cores on purpose",
        "",
        "ingest:",
        f"  source: {found.source}",
        f"  path: {json.dumps(found.path)}",
        "",
        "shard:",
        f"  samples_per_shard: {min(1024, max(16, found.total // 16 // 16 * 16))}",
        f"  splits: {{{', '.join(f'{k}: {v}' for k, v in splits.items())}}}   # about {held_out} samples",
        "",
        "prepare:",
        f"  image_size: {size}"
        + (
            f"                 # median short side {percentile(found.image_sides, 50):.0f} px of {images} images"
            if images
            else "                 # no images in the data"
        ),
        f"  sample_rate: {sample_rate(found.audio_rates)}"
        + (f"             # most clips: {found.audio_rates.most_common(1)[0][0]} Hz" if audio else ""),
        f"  max_audio_seconds: {seconds}"
        + (
            f"         # 90th percentile of {audio} clips: {percentile(found.audio_seconds, 90):.1f} s "
            f"(median {percentile(found.audio_seconds, 50):.1f} s)"
            if audio
            else "          # no audio in the data"
        ),
        f"  max_text_len: {text_tokens(found.caption_words)}"
        + (
            f"              # 95th-percentile caption: {percentile(found.caption_words, 95):.0f} words" if texts else ""
        ),
        f"  vocab_size: {vocabulary(len(found.words))}                # {len(found.words)} distinct words",
        f"  max_answers: {max(1, min(3129, len(found.answers)))}"
        + (
            f"               # {len(found.answers)} distinct answers to {questions} questions"
            if questions
            else "                 # no questions in the data"
        ),
        "  batch_size: 64",
        "  data_cpus: 2                  # Ray Data's share while 2 train workers run",
        "  augment:",
        "    text: {p_synonym: 0.0}      # the shipped synonym table is the demo world's; set synonyms_file to yours",
        "    audio: {p_speed: 0.0, p_pitch: 0.0}   # their phase vocoder is costly on a CPU",
        "    negatives: {p: 0.0}         # hard negative captions need a table of words that contradict each other",
        "  balance:",
        (
            f"    target: {{{', '.join(f'{c}: {s}' for c, s in target.items())}}}   # equal shares: none dominates"
            if target
            else "    target: null                # one kind of sample: nothing to balance"
        ),
        "    loss_weights: none",
        "",
        "train:",
        "  model:",
        "    size: small",
        "    image_encoder: conv",
        "    fusion: hierarchical",
        "    modality_dropout: 0.1",
        f"    overrides: {{patch_size: {patch_size(size)}, conv_attention_layers: 1}}"
        f"   # a {size // patch_size(size)}x{size // patch_size(size)} map of image tokens",
        "  losses:                       # the tasks the data has; 0 turns a task off",
        f"    contrastive: {1.0 if two_way else 0.0}"
        + ("" if two_way else "              # no sample has two modalities"),
        "    matching: 0.0",
        "    masked_text: 0.0",
        "    masked_image: 0.0",
        "    masked_audio: 0.0",
        f"    caption: {1.0 if paired else 0.0}"
        + ("" if paired else "                  # no text with an image or audio"),
        "    answer: 0.0",
        f"    vqa: {1.0 if questions else 0.0}"
        + ("" if questions else "                      # no questions in the data"),
        "  workers: 2",
        "  zero_stage: 2",
        "  precision: auto               # bf16 where the machine computes it faster than fp32, else fp32",
        f"  micro_batch: {micro_batch(round(found.total * splits['train']))}"
        f"                # per worker, of about {round(found.total * splits['train'])} train samples",
        "  stream_epochs: 8",
        "  lr: 2.0e-3",
        "  warmup_steps: 100",
        "  max_steps: 100000",
        f"  max_minutes: {budget_minutes(found.total)}   # the time budget; the cosine schedule anneals to it",
        "  val_every: 200",
        "  checkpoint_every: 200",
        "",
        "evaluate:",
        "  split: test",
        "  beam_size: 1",
    ]
    return "\n".join(aligned(line) for line in lines) + "\n"


COMMENT_COLUMN = 34


def aligned(line: str) -> str:
    """The line with its comment (after two or more spaces and '#') starting at one column."""
    match = re.match(r"^(.*?\S)\s{2,}(# .*)$", line)
    if not match or line.lstrip().startswith("#"):
        return line
    return f"{match.group(1):<{COMMENT_COLUMN - 1}} {match.group(2)}"


def config_name(path: str) -> str:
    """A pipeline name from the data's folder (a manifest's or shard's folder for a file)."""
    where = Path(path).resolve()
    stem = (where.parent if where.is_file() else where).name
    return re.sub(r"[^A-Za-z0-9_.-]", "-", stem).strip("-.") or "mydata"
