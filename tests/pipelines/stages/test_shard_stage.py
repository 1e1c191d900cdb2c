"""Ingest + shard on the demo world, read back with the webdataset library."""

from __future__ import annotations

import hashlib
import json

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from mlflow import MlflowClient

from pipelines.runner import run_pipeline
from pipelines.stages.shard import key_position, split_of
from pipelines.storage import Storage

SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}


# Second letter of the split of demo-s0-00000000 .. 59: tRain, vAl, tEst. Pinned on purpose:
# if the rule ever drifts, samples would move between train and test across runs.
PINNED = "rrrarrrrrrrrrrerrererrrrrerarrerrrrrrrarrrrrrrrerrrrarrrrrrr"


def test_split_rule_is_pinned():
    assert key_position("demo-s0-00000000") == pytest.approx(
        int(hashlib.sha1(b"demo-s0-00000000").hexdigest()[:16], 16) / 2**64
    )
    assert "".join(split_of(f"demo-s0-{i:08d}", SPLITS)[1] for i in range(60)) == PINNED
    # The order the splits are listed in does not matter (the stage identity ignores it too).
    reordered = {"test": 0.1, "val": 0.1, "train": 0.8}
    assert "".join(split_of(f"demo-s0-{i:08d}", reordered)[1] for i in range(60)) == PINNED
    fractions = [split_of(f"k{i}", SPLITS) for i in range(20000)]
    assert fractions.count("train") / 20000 == pytest.approx(0.8, abs=0.01)
    assert fractions.count("test") / 20000 == pytest.approx(0.1, abs=0.01)


ONLY = ["ingest", "shard"]


@pytest.fixture
def sharded(demo_config, ray_cluster):
    outcome = run_pipeline(demo_config, only=ONLY, echo=lambda line: None)
    assert outcome.status == "FINISHED", outcome.failure
    return outcome


def ingested_records(outcome) -> dict[str, dict]:
    parts = Storage(Storage(outcome.by_name()["ingest"].output_uri).uri + "/parts")
    rows = {}
    for name in parts.list_files(suffix=".parquet"):
        for record in pq.read_table(parts.path(name)).to_pylist():
            rows[record["key"]] = record
    return rows


def test_shards_read_back_identical_with_webdataset(sharded, demo_config):
    out = Storage(sharded.by_name()["shard"].output_uri)
    index = out.read_json("index.json")
    records = ingested_records(sharded)
    assert len(records) == 240
    sharded_splits = demo_config.shard.splits
    seen = {}
    for split, info in index["splits"].items():
        assert info["samples"] == sum(s["samples"] for s in info["shards"])
        for shard in info["shards"]:
            data = out.read_bytes(shard["path"])
            assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])
            assert shard["samples"] <= 32
        urls = [str(out.local_path(s["path"])) for s in info["shards"]]
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            seen[sample["__key__"]] = (split, sample)
    assert set(seen) == set(records)
    for key, (split, sample) in seen.items():
        record = records[key]
        assert split == split_of(key, sharded_splits)
        assert sample["txt"] == record["text"] and sample["json"] == record["json"]
        if record["image"] is not None:
            assert sample[record["image_ext"]] == record["image"]
        if record["audio"] is not None:
            assert sample[record["audio_ext"]] == record["audio"]
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {
            ext for ext in ("txt", "json", record["image_ext"], record["audio_ext"]) if ext
        }


def test_index_counts_modality_combinations(sharded):
    index = Storage(sharded.by_name()["shard"].output_uri).read_json("index.json")
    records = ingested_records(sharded)
    total = {}
    for info in index["splits"].values():
        for combo, n in info["combinations"].items():
            total[combo] = total.get(combo, 0) + n
    expected = {}
    for r in records.values():
        combo = "+".join(m for m in ("image", "text", "audio") if r[m] is not None)
        expected[combo] = expected.get(combo, 0) + 1
    assert total == expected
    assert set(total) == {"image+text+audio", "image+text", "text+audio"}


def test_rerun_reuses_and_forced_rerun_writes_identical_bytes(sharded, demo_config):
    first = Storage(sharded.by_name()["shard"].output_uri).read_json("index.json")
    again = run_pipeline(demo_config, only=ONLY, echo=lambda line: None)
    assert [s.state for s in again.stages] == ["reused", "reused"]
    forced = run_pipeline(demo_config, only=ONLY, echo=lambda line: None, force=True)
    assert [s.state for s in forced.stages] == ["ran", "ran"]
    assert Storage(forced.by_name()["shard"].output_uri).read_json("index.json") == first


def test_stage_runs_carry_metrics_and_tables(sharded):
    client = MlflowClient(sharded.tracking_uri)
    shard_run = client.get_run(sharded.by_name()["shard"].run_id)
    index = Storage(sharded.by_name()["shard"].output_uri).read_json("index.json")
    assert shard_run.data.metrics["samples.train"] == index["splits"]["train"]["samples"]
    assert (
        shard_run.data.metrics["samples.train.image_text_audio"]
        == index["splits"]["train"]["combinations"]["image+text+audio"]
    )
    table = json.load(open(client.download_artifacts(shard_run.info.run_id, "tables/shards.json")))
    assert len(table["data"]) == shard_run.data.metrics["shards"]
    ingest_run = client.get_run(sharded.by_name()["ingest"].run_id)
    assert ingest_run.data.metrics["samples"] == 240 and ingest_run.data.params["ingest.demo.num_samples"] == "240"


def test_a_later_copy_of_a_key_is_quarantined_with_its_source_not_merged(tmp_path):
    from pipelines.data.records import empty_record, to_table
    from pipelines.stages.shard import duplicate_rows

    def part(name, rows):
        path = tmp_path / name
        pq.write_table(to_table([empty_record(key, source) | {"text": b"t"} for key, source in rows]), path)
        return str(path)

    parts = [
        part("a.parquet", [("k1", "a.tar"), ("k2", "a.tar"), ("k1", "a.tar")]),
        part("b.parquet", [("k2", "b.tar"), ("k3", "b.tar")]),
    ]
    skip, quarantined = duplicate_rows(parts)
    assert skip == {0: [2], 1: [0]}
    assert [(q["key"], q["source"], q["reason"]) for q in quarantined] == [
        ("k1", "a.tar", "duplicate_key"),
        ("k2", "b.tar", "duplicate_key"),
    ]
    assert "came first from a.tar" in quarantined[1]["detail"]
