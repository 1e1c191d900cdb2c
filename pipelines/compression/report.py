"""The compression report: teacher, student, pruned and quantized side by side, as a table
and one plot (CPU latency at batch 32 against text-to-image recall@1, marker area = size on
disk)."""

from __future__ import annotations

from pathlib import Path

RECALL = "retrieval.text_to_image.r1"
COLUMNS = ("parameters", "size_mb", "latency_b1_ms", "latency_b32_ms", "peak_memory_mb", RECALL)
ORDER = ("teacher", "student", "pruned", "torch_int8", "onnx_int8", "quantized")


def rows(figures: dict[str, dict]) -> list[dict]:
    """One row per model (in pipeline order), with each figure's ratio to the teacher's."""
    names = sorted(figures, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
    base = figures.get("teacher", {})
    out = []
    for name in names:
        row = {"model": name} | {k: figures[name].get(k) for k in COLUMNS}
        for key in ("parameters", "size_mb", "latency_b32_ms"):
            if row.get(key) and base.get(key):
                row[f"{key}_vs_teacher"] = round(row[key] / base[key], 3)
        out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    head = ["model", "parameters", "size MB", "ms @1", "ms @32", "peak MB", "t2i R@1", "ms @32 vs teacher"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        cells = [
            row["model"],
            f"{row['parameters']:,.0f}" if row.get("parameters") else "",
            fmt(row.get("size_mb"), 1),
            fmt(row.get("latency_b1_ms"), 1),
            fmt(row.get("latency_b32_ms"), 1),
            fmt(row.get("peak_memory_mb"), 0),
            fmt(row.get(RECALL), 3),
            fmt(row.get("latency_b32_ms_vs_teacher"), 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def plot(table: list[dict], path: Path) -> Path | None:
    """Latency at batch 32 (x) against recall@1 (y), marker area proportional to size on disk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [r for r in table if r.get("latency_b32_ms") and r.get(RECALL) is not None and r.get("size_mb")]
    if not drawn:
        return None
    largest = max(r["size_mb"] for r in drawn)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in drawn:
        area = 60 + 1400 * row["size_mb"] / largest
        ax.scatter(row["latency_b32_ms"], row[RECALL], s=area, alpha=0.55)
        ax.annotate(
            f"{row['model']}\n{row['size_mb']:.1f} MB",
            (row["latency_b32_ms"], row[RECALL]),
            fontsize=8,
            ha="center",
            va="center",
        )
    ax.set_xlabel("CPU latency at batch 32 (ms, median; embeddings of text, image and audio)")
    ax.set_ylabel("text-to-image recall@1 (test split)")
    ax.set_title("Compression: latency against recall, marker area = size on disk")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
