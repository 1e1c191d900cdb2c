"""The frozen benchmark: one split of shards copied aside once, with the sha256 of every file,
and every model the nightly compares scored on it by the same code.

    bench = freeze(shard_output_uri, "test", Storage(".../benchmark/crossmodal"), origin="run 9f3c")
    bench = open_frozen(Storage(".../benchmark/crossmodal"))   # BenchmarkChanged if a file changed
    figures = score_models({"challenger": folder, "champion": other}, bench, spec, Scored(split=BENCHMARK_SPLIT))

New data never changes it: the shard stage splits by a hash of each key, so the samples in it
never move to train, and the copy is never rewritten. A changed, missing or extra file is a
one-line refusal, since scores on a different set would not compare with the ones before.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.config.evaluate import EvaluateConfig
from pipelines.errors import UserError
from pipelines.storage import Storage

FORMAT = "crossmodal-benchmark/1"
MANIFEST = "benchmark.json"
BENCHMARK_SPLIT = "benchmark"  # the split name the frozen shards get in a scoring spec


class BenchmarkChanged(UserError):
    """The frozen benchmark's files are not the ones it was frozen with; one line."""


@dataclass
class Benchmark:
    folder: Storage
    manifest: dict

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def samples(self) -> int:
        return sum(f["samples"] for f in self.manifest["files"])

    def shard_uris(self) -> list[str]:
        return [self.folder.child("shards", f["name"]).uri for f in self.manifest["files"]]


def content_hash(files: list[dict]) -> str:
    listing = sorted((f["name"], f["sha256"]) for f in files)
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def file_sha256(store: Storage, name: str) -> str:
    digest = hashlib.sha256()
    with store.open_read(name) as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def freeze(shards_uri: str, split: str, folder: Storage, origin: str) -> Benchmark:
    """Copy `split` of the shard stage's output at `shards_uri` into `folder` and write its
    manifest last (a freeze that died half-way has no manifest and is redone)."""
    shards = Storage(shards_uri)
    index = shards.read_json("index.json")
    if split not in index["splits"] or not index["splits"][split]["shards"]:
        raise UserError(
            f"nightly.benchmark.split: the data has no {split!r} samples to freeze "
            f"(splits: {', '.join(n for n, s in index['splits'].items() if s['shards'])})"
        )
    files = []
    for entry in index["splits"][split]["shards"]:
        name = entry["path"].replace("/", "_")
        folder.child("shards").write_bytes(shards.read_bytes(entry["path"]), name)
        files.append({"name": name, "samples": entry["samples"], "bytes": entry["bytes"], "sha256": entry["sha256"]})
    for item in files:  # what was written is what the index says (no copy went wrong)
        if file_sha256(folder.child("shards"), item["name"]) != item["sha256"]:
            raise BenchmarkChanged(f"{folder.uri}/shards/{item['name']}: the copy differs from its source")
    manifest = {
        "format": FORMAT,
        "split": split,
        "frozen_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "origin": origin,
        "files": files,
        "content_hash": content_hash(files),
    }
    folder.write_json(manifest, MANIFEST)
    return Benchmark(folder, manifest)


def open_frozen(folder: Storage) -> Benchmark | None:
    """The benchmark in `folder`, its files checked against their sha256; None if none was
    frozen there yet. BenchmarkChanged names the first file that differs."""
    if not folder.exists(MANIFEST):
        return None
    manifest = folder.read_json(MANIFEST)
    if manifest.get("format") != FORMAT or content_hash(manifest["files"]) != manifest["content_hash"]:
        raise BenchmarkChanged(f"{folder.uri}/{MANIFEST}: the manifest was edited (its content hash does not match)")
    store = folder.child("shards")
    present = set(store.list_files()) if folder.exists("shards") else set()
    for item in manifest["files"]:
        if item["name"] not in present:
            raise BenchmarkChanged(f"{store.uri}/{item['name']}: missing from the frozen benchmark")
        if file_sha256(store, item["name"]) != item["sha256"]:
            raise BenchmarkChanged(
                f"{store.uri}/{item['name']}: changed since it was frozen on {manifest['frozen_at']} "
                "(scores would not compare with earlier nights; restore the file, or freeze a new "
                "benchmark in an empty nightly.benchmark.folder)"
            )
    extra = sorted(present - {item["name"] for item in manifest["files"]})
    if extra:
        raise BenchmarkChanged(f"{store.uri}/{extra[0]}: not part of the frozen benchmark")
    return Benchmark(folder, manifest)


def scoring_spec(spec, bench: Benchmark, saved):
    """The prepared stream's spec, reading the benchmark's shards with `saved`'s own tokenizer
    and answers: each model is scored on the token ids it was trained with."""
    return spec.model_copy(
        update={
            "shards": {BENCHMARK_SPLIT: bench.shard_uris()},
            "materialized": {},
            "tokenizer_json": saved.tokenizer.to_json(),
            "answers": list(saved.answers),
        }
    )


def score_models(folders: dict[str, Path], bench: Benchmark, spec, section, rounds: int = 3) -> dict[str, dict]:
    """Task metrics and cost figures of each model folder on the benchmark (`section`: a
    `Scored` with split BENCHMARK_SPLIT): the evaluate stage's scoring code, then the cost
    measured in `rounds` interleaved rounds (A B, B A, A B ...) after all scoring is done, each
    model's latency the median over its rounds. Measured one after the other, a background load
    that comes or goes (the scoring's own Ray tasks winding down) showed up as a 19 % latency
    "regression" between two models of the same shape."""
    import statistics

    from pipelines.compression import measure
    from pipelines.compression.folder import load_any
    from pipelines.stages.compressed import test_batches
    from pipelines.stages.evaluate import score

    figures, batches = {}, {}
    for name, folder in folders.items():
        saved = load_any(Path(folder))
        model_spec = scoring_spec(spec, bench, saved)
        figures[name], _ = score(
            saved, model_spec, EvaluateConfig(split=BENCHMARK_SPLIT, max_samples=section.max_samples)
        )
        batches[name] = test_batches(model_spec, section)
        del saved
    order, timings = list(folders), {name: [] for name in folders}
    for round_number in range(rounds):
        for name in order if round_number % 2 == 0 else reversed(order):
            cost = measure.measure(
                folders[name],
                batches[name],
                threads=section.measure.threads,
                repeats=section.measure.repeats,
                memory=round_number == 0,
            )
            timings[name].append(cost)
    for name, costs in timings.items():
        first = costs[0]
        figures[name] |= {
            "parameters": first.parameters,
            "size_mb": first.size_bytes / 1e6,
            "latency_b1_ms": statistics.median(c.latency_b1_ms for c in costs),
            "latency_b32_ms": statistics.median(c.latency_b32_ms for c in costs),
            "peak_memory_mb": first.peak_memory_mb,
            "threads": first.threads,
        }
    return figures
