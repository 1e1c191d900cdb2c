"""The evaluate stage's figures (PNG): what people would rather look at than read.

- similarity.png: text x image cosine similarities of the first samples (the diagonal pairs match);
- recall_at_k.png: recall@K for K = 1..50 in every retrieval direction;
- examples.png: text queries with their top-3 images, image and audio queries (thumbnail,
  log-mel spectrogram) with their top-3 captions; the true match is marked.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.evaluation.collect import Collected, modality_flags
from pipelines.evaluation.metrics import all_directions, recall_curve


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    import matplotlib.pyplot as plt

    return plt


def similarity_heatmap(collected: Collected, path: Path, size: int = 32) -> Path | None:
    """Text x image similarities (text x audio where the split has no image pairs); None
    when no sample has text with either."""
    plt = pyplot()
    embeddings, present = collected.stacked()
    pairs = [
        (m, (present["text"] & present[m]).nonzero().squeeze(1)[:size])
        for m in ("image", "audio")
        if "text" in present and m in present
    ]
    other, rows = next(((m, rows) for m, rows in pairs if len(rows) > 1), (None, None))
    if other is None:
        return None
    sims = (F.normalize(embeddings["text"][rows], dim=-1) @ F.normalize(embeddings[other][rows], dim=-1).T).numpy()
    fig, ax = plt.subplots(figsize=(7, 6))
    shown = ax.imshow(sims, cmap="viridis")
    fig.colorbar(shown, ax=ax, label="cosine similarity")
    ax.set(
        xlabel=other,
        ylabel="text",
        title=f"text x {other} similarity, first {len(rows)} pairs\n(matching pairs on the diagonal)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def recall_curves(collected: Collected, path: Path, max_k: int = 50) -> Path | None:
    plt = pyplot()
    embeddings, present = collected.stacked()
    directions = all_directions(embeddings, present)
    if not directions:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for direction, (ranks, candidates) in sorted(directions.items()):
        k = min(max_k, candidates)
        ax.plot(
            np.arange(1, k + 1),
            recall_curve(ranks, k),
            label=f"{direction.replace('_to_', ' -> ')} ({candidates} candidates)",
        )
    ax.set(xscale="log", xlabel="K", ylabel="recall@K", ylim=(0, 1.02), title="retrieval recall@K on the test split")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_mel(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    import librosa

    mel = librosa.feature.melspectrogram(
        y=wave.astype(np.float32), sr=sample_rate, n_fft=400, hop_length=160, n_mels=40
    )
    return librosa.power_to_db(mel, ref=np.max)


def top3(query: torch.Tensor, candidates: torch.Tensor, rows: np.ndarray) -> list[tuple[int, float]]:
    sims = F.normalize(candidates[rows], dim=-1) @ F.normalize(query, dim=-1)
    best = sims.topk(min(3, len(rows)))
    return [(int(rows[i]), float(s)) for s, i in zip(best.values, best.indices)]


def example_grid(collected: Collected, path: Path, sample_rate: int, per_kind: int = 3) -> Path | None:
    """Text, image and audio queries with their top-3 results; None when no sample has a pair."""
    plt = pyplot()
    embeddings, _ = collected.stacked()
    flags = modality_flags(collected)
    media = len(collected.images)
    has = {m: np.flatnonzero(flags[m][:media]) for m in ("text", "image", "audio")}
    queries = []
    for k, (source, target) in enumerate((("text", "image"), ("image", "text"), ("audio", "text"))):
        both = np.intersect1d(has[source], has[target])
        # Other samples for each kind of query where the split has enough of them.
        chosen = both[k * per_kind : (k + 1) * per_kind] if len(both) >= (k + 1) * per_kind else both[:per_kind]
        queries += [(source, target, i) for i in chosen]
    if not queries:
        return None
    fig, axes = plt.subplots(len(queries), 4, figsize=(13, 2.3 * len(queries)), squeeze=False)
    for row, (source, target, index) in enumerate(queries):
        draw_item(axes[row][0], collected, source, index, sample_rate, title=f"{source} query")
        for col, (hit, score) in enumerate(top3(embeddings[source][index], embeddings[target], has[target]), 1):
            draw_item(
                axes[row][col],
                collected,
                target,
                hit,
                sample_rate,
                title=f"#{col}  {score:+.2f}" + ("  (match)" if hit == index else ""),
                good=hit == index,
            )
    fig.suptitle("example queries and their top-3 results (test split)")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def draw_item(
    ax, collected: Collected, modality: str, index: int, sample_rate: int, title: str, good: bool | None = None
):
    ax.set_xticks([])
    ax.set_yticks([])
    if modality == "image":
        ax.imshow(collected.images[index])
    elif modality == "audio":
        ax.imshow(log_mel(collected.audio[index], sample_rate), origin="lower", aspect="auto", cmap="magma")
    else:
        ax.text(
            0.02, 0.5, textwrap.fill(collected.references[index], 34), va="center", fontsize=8, transform=ax.transAxes
        )
    ax.set_title(title, fontsize=9, color={True: "green", False: "firebrick", None: "black"}[good])
    if good is not None:
        for spine in ax.spines.values():
            spine.set(edgecolor="green" if good else "firebrick", linewidth=2)
