"""Plots people would rather look at than read: the balancing histogram, the augmentation preview."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # no display on workers
import matplotlib.pyplot as plt
import numpy as np


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def balance_histogram(before: dict[str, int], after: dict[str, int], target: dict[str, float] | None) -> bytes:
    combos = sorted(set(before) | set(after), key=lambda c: -before.get(c, 0))
    total_before, total_after = max(sum(before.values()), 1), max(sum(after.values()), 1)
    x = np.arange(len(combos))
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(combos)), 4))
    axis.bar(x - 0.2, [before.get(c, 0) / total_before for c in combos], 0.4, label=f"before ({total_before} samples)")
    axis.bar(x + 0.2, [after.get(c, 0) / total_after for c in combos], 0.4, label=f"after, epoch 0 ({total_after})")
    if target:
        for i, c in enumerate(combos):
            if c in target:
                axis.hlines(target[c], i - 0.45, i + 0.45, colors="black", linestyles="dashed")
    axis.set_xticks(x, combos)
    axis.set_ylabel("share of the train stream")
    axis.set_title("Modality combinations before and after balancing (dashed: target)")
    axis.legend()
    return png(figure)


def log_mel(wave: np.ndarray, rate: int) -> np.ndarray:
    import librosa

    mel = librosa.feature.melspectrogram(y=wave.astype(np.float32), sr=rate, n_fft=400, hop_length=160, n_mels=64)
    return librosa.power_to_db(mel + 1e-10, ref=np.max)


def augmentation_preview(before: list[dict], after: list[dict], rate: int) -> bytes:
    """Columns: samples. Rows: image before/after, log-mel before/after; texts in the titles."""
    columns = len(before)
    figure, axes = plt.subplots(4, columns, figsize=(2.6 * columns, 11), squeeze=False)
    for col, (b, a) in enumerate(zip(before, after)):
        for row, (sample, label) in enumerate(((b, "before"), (a, "after"))):
            image_axis, mel_axis = axes[row, col], axes[row + 2, col]
            if sample["has_image"]:
                image_axis.imshow(sample["image"])
            image_axis.set_title(f"{label}: {wrap(sample['text'])}", fontsize=6)
            if sample["has_audio"]:
                mel_axis.imshow(log_mel(sample["audio"][: sample["audio_len"]], rate), origin="lower", aspect="auto")
            mel_axis.set_title(f"audio {label}", fontsize=7)
            for axis in (image_axis, mel_axis):
                axis.set_xticks([])
                axis.set_yticks([])
    figure.suptitle("Augmentation preview (train, epoch 0): images, texts and log-mel spectrograms")
    figure.subplots_adjust(hspace=0.75)  # room for the captions above each image
    return png(figure)


def wrap(text: str, width: int = 34) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])
