"""An on-disk embedding index of a corpus of shards, and top-k search in it.

`build_index` streams the shards through Ray Data (the same safe reader and decoder as the
prepare stage; quarantined samples are counted, not indexed) and embeds every modality a
sample has with the model in a pool of actors. The driver appends each batch to disk as it
arrives, so memory stays flat whatever the corpus size:

    INDEX/
      index.json           format, model fingerprint, counts, embedding width, quarantine counts
      items.jsonl          one line per sample: key, caption, has_text / has_image / has_audio
      <modality>.f32       float32 embeddings, one row per sample (zeros where it lacks one)
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.config import MODALITIES
from pipelines.apps.api import CrossModal, InputError

FORMAT = "crossmodal-index/1"


def shard_paths(shards: list[str]) -> list[str]:
    """Shard files from folders (searched recursively), files and glob patterns."""
    paths: list[str] = []
    for item in shards:
        path = Path(item)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*.tar"))
        elif any(c in item for c in "*?["):
            found = sorted(str(p) for p in Path().glob(item))
        else:
            found = [item] if path.is_file() else []
        if not found:
            raise InputError(f"{item}: no .tar shards there")
        paths += found
    return paths


class Embedder:
    """A Ray Data actor: loads the model once, embeds decoded batches."""

    def __init__(self, folder: str):
        from model.io import load

        self.app = CrossModal(load(folder), Path(folder))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from pipelines.inference.predict import embed

        app = self.app
        model_batch = app.batch(
            texts=[str(t) for t in batch["text"]],
            images=list(batch["image"]),
            audio=list(zip(batch["audio"], batch["audio_len"])),
        )
        for m in MODALITIES:
            model_batch[f"has_{m}"] = torch.as_tensor(batch[f"has_{m}"])
        vectors = embed(app.model, model_batch)
        out = {"key": batch["key"], "text": batch["text"], "reason": batch["reason"]}
        for m in MODALITIES:
            out[f"has_{m}"] = batch[f"has_{m}"]
            out[f"emb_{m}"] = np.where(batch[f"has_{m}"][:, None], vectors[m], 0.0).astype(np.float32)
        return out


def build_index(
    app: CrossModal,
    shards: list[str],
    folder: str | Path,
    batch_size: int = 64,
    actors: int = 1,
    member_limit_mb: float = 64.0,
) -> dict:
    import ray

    from pipelines.data.datasource import SafeShardDatasource
    from pipelines.data.transforms import decode_batch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = shard_paths(shards)
    started = time.perf_counter()
    decoded = ray.data.read_datasource(
        SafeShardDatasource(paths, member_limit=int(member_limit_mb * 2**20)), override_num_blocks=len(paths)
    ).map_batches(decode_batch, fn_kwargs={"settings": app.settings}, batch_size=batch_size, batch_format="numpy")
    # Quarantined rows ride along (zeros, no modality) so the driver can count them by reason.
    embedded = decoded.map_batches(
        Embedder,
        fn_constructor_kwargs={"folder": str(app.folder)},
        concurrency=actors,
        batch_size=batch_size,
        batch_format="numpy",
    )
    counts: Counter = Counter()
    quarantined: Counter = Counter()
    files = {m: open(folder / f"{m}.f32", "wb") for m in MODALITIES}
    with open(folder / "items.jsonl", "w", encoding="utf-8") as items:
        for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
            for row in range(len(batch["key"])):
                if batch["reason"][row]:
                    quarantined[str(batch["reason"][row])] += 1
                    continue
                has = {f"has_{m}": bool(batch[f"has_{m}"][row]) for m in MODALITIES}
                items.write(
                    json.dumps(
                        {"key": str(batch["key"][row]), "text": str(batch["text"][row]), **has}, ensure_ascii=False
                    )
                    + "\n"
                )
                for m in MODALITIES:
                    batch[f"emb_{m}"][row].tofile(files[m])
                    counts[m] += has[f"has_{m}"]
                counts["samples"] += 1
    for f in files.values():
        f.close()
    meta = {
        "format": FORMAT,
        "model": str(app.folder),
        "model_fingerprint": app.fingerprint,
        "embed_dim": app.model.cfg.embed_dim,
        "samples": counts["samples"],
        "modalities": {m: counts[m] for m in MODALITIES},
        "quarantined": dict(quarantined),
        "shards": len(paths),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (folder / "index.json").write_text(json.dumps(meta, indent=2))
    return meta


@dataclass
class Index:
    folder: Path
    meta: dict
    items: list[dict]
    vectors: dict[str, np.ndarray]  # modality -> (samples, embed_dim), memory-mapped

    def rows(self, modality: str) -> np.ndarray:
        return np.array([i for i, item in enumerate(self.items) if item[f"has_{modality}"]], dtype=np.int64)


def load_index(folder: str | Path) -> Index:
    folder = Path(folder)
    meta_file = folder / "index.json"
    if not meta_file.is_file():
        raise InputError(f"{folder}: not an index (no index.json); build one with `crossmodal index MODEL SHARDS`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise InputError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    items = [json.loads(line) for line in (folder / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    shape = (meta["samples"], meta["embed_dim"])
    vectors = {
        m: np.memmap(folder / f"{m}.f32", dtype=np.float32, mode="r", shape=shape)
        if meta["samples"]
        else np.zeros(shape, np.float32)
        for m in MODALITIES
    }
    return Index(folder, meta, items, vectors)


@dataclass(frozen=True)
class Hit:
    modality: str
    key: str
    score: float  # cosine similarity
    text: str


def search(app: CrossModal, index: Index, query_modality: str, query: np.ndarray, k: int = 10) -> dict[str, list[Hit]]:
    """Top-k samples of the index in every modality other than the query's, by cosine similarity."""
    if k < 1:
        raise InputError(f"-k {k}: must be at least 1")
    if index.meta["model_fingerprint"] != app.fingerprint:
        raise InputError(
            f"{index.folder}: built by another model ({index.meta['model']}, weights "
            f"{index.meta['model_fingerprint']}); this model's weights are {app.fingerprint}: rebuild the index"
        )
    results: dict[str, list[Hit]] = {}
    for target in MODALITIES:
        rows = index.rows(target)
        if target == query_modality or len(rows) == 0:
            continue
        scores = np.asarray(index.vectors[target][rows]) @ query.astype(np.float32)
        best = np.argsort(-scores)[:k]
        results[target] = [
            Hit(target, index.items[rows[i]]["key"], float(scores[i]), index.items[rows[i]]["text"]) for i in best
        ]
    return results
