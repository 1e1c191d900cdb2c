"""The frozen benchmark: copied once with every file's sha256, refused in one line if it changed."""

from __future__ import annotations

import hashlib
import json

import pytest

from pipelines.errors import UserError
from pipelines.evaluation.benchmark import BenchmarkChanged, freeze, open_frozen
from pipelines.storage import Storage


def shard_output(folder, splits: dict[str, list[bytes]]):
    """A shard stage's output: tars per split and the index.json that lists them."""
    index = {"format": "crossmodal-shards/1", "splits": {}}
    for split, contents in splits.items():
        shards = []
        for number, content in enumerate(contents):
            path = f"{split}/{split}-{number:06d}.tar"
            (folder / split).mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(content)
            digest = hashlib.sha256(content).hexdigest()
            shards.append({"path": path, "samples": 10 + number, "bytes": len(content), "sha256": digest})
        index["splits"][split] = {"samples": sum(s["samples"] for s in shards), "shards": shards}
    (folder / "index.json").write_text(json.dumps(index))
    return Storage(str(folder))


@pytest.fixture
def frozen(tmp_path):
    source = shard_output(tmp_path / "shards", {"train": [b"t0"], "test": [b"first", b"second"]})
    return freeze(source.uri, "test", Storage(str(tmp_path / "bench")), origin="run 1"), tmp_path / "bench"


def test_freeze_copies_the_split_and_reopens_unchanged(frozen, tmp_path):
    bench, folder = frozen
    assert bench.samples == 21 and [p.rsplit("/", 1)[1] for p in bench.shard_uris()] == [
        "test_test-000000.tar",
        "test_test-000001.tar",
    ]
    again = open_frozen(Storage(str(folder)))
    assert again.content_hash == bench.content_hash and again.manifest["origin"] == "run 1"
    # New data in the shard stage's output never reaches the frozen copy.
    shard_output(tmp_path / "shards", {"test": [b"first", b"second", b"third"]})
    assert open_frozen(Storage(str(folder))).samples == 21


def test_nothing_frozen_yet_is_none(tmp_path):
    assert open_frozen(Storage(str(tmp_path / "empty"))) is None


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda f: (f / "shards" / "test_test-000001.tar").write_bytes(b"edited"),
            "test_test-000001.tar: changed since",
        ),
        (lambda f: (f / "shards" / "test_test-000000.tar").unlink(), "test_test-000000.tar: missing from the frozen"),
        (lambda f: (f / "shards" / "extra.tar").write_bytes(b"x"), "extra.tar: not part of the frozen benchmark"),
        (lambda f: edit_manifest(f), "benchmark.json: the manifest was edited"),
    ],
)
def test_a_changed_benchmark_is_refused_in_one_line(frozen, damage, message):
    _, folder = frozen
    damage(folder)
    with pytest.raises(BenchmarkChanged, match=message) as caught:
        open_frozen(Storage(str(folder)))
    assert isinstance(caught.value, UserError) and "\n" not in str(caught.value)


def edit_manifest(folder):
    manifest = json.loads((folder / "benchmark.json").read_text())
    manifest["files"][0]["sha256"] = "0" * 64
    (folder / "benchmark.json").write_text(json.dumps(manifest))


def test_a_split_without_samples_cannot_be_frozen(tmp_path):
    source = shard_output(tmp_path / "shards", {"train": [b"t0"], "test": []})
    with pytest.raises(UserError, match="nightly.benchmark.split: the data has no 'test' samples"):
        freeze(source.uri, "test", Storage(str(tmp_path / "bench")), origin="run 1")
