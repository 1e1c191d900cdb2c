"""Shard: write the ingested records as WebDataset tars, split into train/val/test by key hash.

Member names follow img2dataset (`key.jpg`, `key.txt`, `key.wav`/`key.flac`, `key.json`), so
other tools read our shards and we read theirs. A sample's split depends only on a hash of its
key: stable across runs, and adding samples never moves existing ones. Tars are byte-for-byte
reproducible (fixed mtime and owner), and `index.json` lists each shard's sample count, byte
size and sha256. A key seen again (twice in one shard, or one sample's members split over
two shards) keeps its first sample, in shard order; each later copy is quarantined in
`quarantine.jsonl` as `duplicate_key`, never merged into the first nor dropped unseen.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import pyarrow.parquet as pq
import webdataset as wds

from pipelines.config.shard import ShardConfig
from pipelines.dag import StageContext, StageResult
from pipelines.data.records import combination
from pipelines.parallel import map_tasks
from pipelines.storage import Storage

INDEX_FORMAT = "crossmodal-shards/1"


def key_position(key: str) -> float:
    """Where a key falls on [0, 1): the first 8 bytes of its sha1."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(key: str, splits: dict[str, float]) -> str:
    """Splits take their fractions of [0, 1) in name order, so listing them in another order in
    the YAML changes nothing (the stage identity ignores key order too)."""
    position, edge = key_position(key), 0.0
    names = sorted(splits)
    for name in names:
        edge += splits[name]
        if position < edge:
            return name
    return names[-1]  # rounding: the last split takes the remainder


def shard(cfg: ShardConfig, ctx: StageContext) -> StageResult:
    parts_store = Storage(ctx.inputs["ingest"].outputs["parts"])
    parts = [parts_store.child(p).uri for p in parts_store.list_files(suffix=".parquet")]
    duplicates, quarantined = duplicate_rows(parts)
    units = [(index, uri, sorted(duplicates.get(index, []))) for index, uri in enumerate(parts)]
    written = map_tasks(write_shards, units, desc="shards", cfg=cfg, out=ctx.output)
    index = build_index([entry for part in written for entry in part], cfg)
    ctx.output.write_json(index, "index.json")
    ctx.output.write_bytes("".join(json.dumps(r) + "\n" for r in quarantined).encode(), "quarantine.jsonl")
    dropped = len(quarantined)
    metrics = {
        "shards": sum(len(s["shards"]) for s in index["splits"].values()),
        "duplicate_keys": dropped,
        "bytes": sum(sh["bytes"] for s in index["splits"].values() for sh in s["shards"]),
    }
    for name, split in index["splits"].items():
        metrics[f"samples.{name}"] = split["samples"]
        metrics |= {f"samples.{name}.{combo}": n for combo, n in split["combinations"].items()}
    print(
        "shard: "
        + ", ".join(
            f"{name} {s['samples']} samples in {len(s['shards'])} shards" for name, s in index["splits"].items()
        )
        + (f"; {dropped} later copies of a key quarantined (duplicate_key)" if dropped else "")
    )
    return StageResult(
        outputs={
            "shards": ctx.output.uri,
            "index": ctx.output.uri + "/index.json",
            "quarantine": ctx.output.uri + "/quarantine.jsonl",
        },
        metrics=metrics,
        summary={"splits": {n: s["samples"] for n, s in index["splits"].items()}, "duplicate_keys": dropped},
        tables={
            "shards": [{"split": n, **sh} for n, s in index["splits"].items() for sh in s["shards"]],
            "quarantine": quarantined[:5000],
        },
    )


def duplicate_rows(parts: list[str]) -> tuple[dict[int, list[int]], list[dict]]:
    """Rows whose key appeared earlier (in part order; the first occurrence wins), by part, and
    a quarantine line for each (key, source, reason, and where the kept copy came from)."""
    first: dict[str, str] = {}
    duplicates: dict[int, list[int]] = {}
    quarantined = []
    for index, uri in enumerate(parts):
        part = Storage(uri)
        table = pq.read_table(part.path(), columns=["key", "source"], filesystem=part.fs)
        for row, (key, source) in enumerate(zip(*(table.column(c).to_pylist() for c in ("key", "source")))):
            if key in first:
                duplicates.setdefault(index, []).append(row)
                quarantined.append(
                    {
                        "key": key,
                        "source": source,
                        "member": "",
                        "reason": "duplicate_key",
                        "detail": f"a sample with this key came first from {first[key]}: that one is kept",
                    }
                )
            else:
                first[key] = source
    return duplicates, quarantined


class HashingWriter:
    """Forwards writes to a stream while counting bytes and computing their sha256."""

    def __init__(self, stream):
        self.stream, self.sha, self.size = stream, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.stream.write(data)


def members(record: dict) -> dict[str, bytes]:
    sample = {"__key__": record["key"]}
    if record["image"] is not None:
        sample[record["image_ext"]] = record["image"]
    for column in ("text", "json", "cls"):
        if record[column] is not None:
            sample["txt" if column == "text" else column] = record[column]
    if record["audio"] is not None:
        sample[record["audio_ext"]] = record["audio"]
    return sample


def write_shards(unit: tuple[int, str, list[int]], cfg: ShardConfig, out: Storage) -> list[dict]:
    """One ingest part -> its shards of every split (Ray task; idempotent)."""
    part_index, uri, skip = unit
    part = Storage(uri)
    table = pq.read_table(part.path(), filesystem=part.fs)
    by_split: dict[str, list[dict]] = {name: [] for name in cfg.splits}
    skipped = set(skip)
    for row, record in enumerate(table.to_pylist()):
        if row not in skipped:
            by_split[split_of(record["key"], cfg.splits)].append(record)
    entries = []
    for split, records in by_split.items():
        for number, start in enumerate(range(0, len(records), cfg.samples_per_shard)):
            name = f"{split}/shard-{part_index:05d}-{number:04d}.tar"
            entries.append({"split": split, **write_tar(out, name, records[start : start + cfg.samples_per_shard])})
    return entries


def write_tar(out: Storage, name: str, records: list[dict]) -> dict:
    with out.open_write(name) as stream:
        hashing = HashingWriter(stream)
        # Fixed mtime/owner make the bytes (and the sha256) reproducible; PAX allows long keys.
        with wds.TarWriter(
            hashing, encoder=False, mtime=0.0, user="crossmodal", group="crossmodal", mode=0o444, format="PAX_FORMAT"
        ) as writer:
            for record in records:
                writer.write(members(record))
    combos = Counter(combination(r) for r in records)
    return {
        "path": name,
        "samples": len(records),
        "bytes": hashing.size,
        "sha256": hashing.sha.hexdigest(),
        "combinations": dict(combos),
    }


def build_index(entries: list[dict], cfg: ShardConfig) -> dict:
    splits = {}
    for name, fraction in cfg.splits.items():
        mine = sorted((e for e in entries if e["split"] == name), key=lambda e: e["path"])
        combos = Counter()
        for e in mine:
            combos.update(e["combinations"])
        splits[name] = {
            "fraction": fraction,
            "samples": sum(e["samples"] for e in mine),
            "combinations": dict(sorted(combos.items())),
            "shards": [{k: e[k] for k in ("path", "samples", "bytes", "sha256")} for e in mine],
        }
    return {
        "format": INDEX_FORMAT,
        "split_rule": "sha1(key)[:8] / 2**64 along the split fractions in name order",
        "samples_per_shard": cfg.samples_per_shard,
        "splits": splits,
    }
