"""Ingest from user data: WebDataset shards of other tools, a folder, a JSONL manifest."""

from __future__ import annotations

import json
import pickle
import posixpath
import shutil
import tarfile

import pyarrow.parquet as pq
import webdataset as wds

from pipelines.config import load_config
from pipelines.runner import run_pipeline
from pipelines.storage import Storage
from tests.conftest import DEMO_CONFIG, small_overrides


def ingest(tmp_path, *overrides, only=("ingest",)):
    cfg = load_config(DEMO_CONFIG, small_overrides(tmp_path) + list(overrides))
    outcome = run_pipeline(cfg, only=list(only), echo=lambda line: None)
    assert outcome.status == "FINISHED", outcome.failure
    return outcome


def records_and_quarantine(outcome):
    out = Storage(outcome.by_name()["ingest"].output_uri)
    rows = [r for name in out.list_files("parts", suffix=".parquet") for r in pq.read_table(out.path(name)).to_pylist()]
    quarantine = [json.loads(line) for line in out.read_bytes("quarantine.jsonl").decode().splitlines()]
    return {r["key"]: r for r in rows}, quarantine


def samples_in(tar_path) -> int:
    """Distinct sample keys in a tar (WebDataset rule), counted independently of our reader."""
    with tarfile.open(tar_path) as archive:
        return len(
            {
                posixpath.join(posixpath.dirname(m.name), posixpath.basename(m.name).split(".")[0])
                for m in archive
                if m.isfile()
            }
        )


def test_shards_of_other_tools_are_ingested_and_counted(tmp_path, fixtures_dir, ray_cluster):
    source = tmp_path / "theirs"
    shutil.copytree(fixtures_dir / "shards", source)
    outcome = ingest(tmp_path, "ingest.source=shards", f"ingest.path={source}", only=("ingest", "shard"))
    records, quarantine = records_and_quarantine(outcome)
    total_in = sum(samples_in(p) for p in source.iterdir())
    assert len(records) + len(quarantine) == total_in == 102
    reasons = sorted(q["reason"] for q in quarantine)
    assert reasons == ["empty_member"] * 2 + ["pickle_member"] * 3
    assert all(q["source"].endswith(("lhotse-zero-length.tar", "speechbrain-pickled-pth.tar")) for q in quarantine)
    # The Chinese transcript and its slash-containing key survive our own shards.
    shards = Storage(outcome.by_name()["shard"].output_uri)
    urls = [str(shards.local_path(p)) for p in shards.list_files(suffix=".tar")]
    ours = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
    key = "test/resources/dataset/aishell-BAC009S0724W0121"
    assert "广州市房地产中介协会分析" in ours[key]["txt"].decode()
    assert ours[key]["wav"] == records[key]["audio"]
    assert len(ours) == len(records)


def test_folder_of_files_grouped_by_key(tmp_path, fixtures_dir, ray_cluster):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(fixtures_dir / "images" / "coco-000000039769.jpg", folder / "cats.jpg")
    (folder / "cats.txt").write_text("two cats on a pink couch")
    shutil.copy(fixtures_dir / "images" / "pug-rgba.png", folder / "sub" / "pug.png")
    shutil.copy(fixtures_dir / "audio" / "harvard-birch-canoe.wav", folder / "sub" / "pug.wav")
    (folder / "sub" / "pug.json").write_text('{"question": "what animal?", "answer": "dog"}')
    (folder / "model.pth").write_bytes(pickle.dumps([1, 2, 3]))
    (folder / "empty.txt").write_text("")
    (folder / "odd name #1 100%.txt").write_text("spaces, hash and percent in a file name")
    first = ingest(tmp_path, "ingest.source=folder", f"ingest.path={folder}")
    records, quarantine = records_and_quarantine(first)
    assert set(records) == {"cats", "sub/pug", "odd name #1 100%"}
    assert records["odd name #1 100%"]["text"] == b"spaces, hash and percent in a file name"
    assert records["cats"]["image"] == (fixtures_dir / "images" / "coco-000000039769.jpg").read_bytes()
    assert records["sub/pug"]["audio_ext"] == "wav" and records["sub/pug"]["image_ext"] == "png"
    assert json.loads(records["sub/pug"]["json"])["answer"] == "dog"
    assert sorted((q["key"], q["reason"]) for q in quarantine) == [
        ("empty", "empty_member"),
        ("model", "pickle_member"),
    ]
    # Unchanged data is reused; a new file in the folder means the stage runs again.
    assert ingest(tmp_path, "ingest.source=folder", f"ingest.path={folder}").by_name()["ingest"].state == "reused"
    (folder / "late.txt").write_text("a file added after the first run")
    again = ingest(tmp_path, "ingest.source=folder", f"ingest.path={folder}")
    assert again.by_name()["ingest"].state == "ran"
    assert "late" in records_and_quarantine(again)[0]


def test_jsonl_manifest_with_bad_lines(tmp_path, fixtures_dir, ray_cluster):
    media = tmp_path / "media"
    media.mkdir()
    shutil.copy(fixtures_dir / "images" / "confusing-pictures.jpg", media / "ironing.jpg")
    shutil.copy(fixtures_dir / "audio" / "spk1_snt1.wav", media / "child.wav")
    (media / "weights.pt").write_bytes(b"PK\x03\x04....archive/data.pkl....")
    lines = [
        {
            "key": "ironing",
            "image": "media/ironing.jpg",
            "text": "a man ironing on the back of a yellow SUV",
            "question": "what colour is the car?",
            "answer": "yellow",
        },
        {"audio": "media/child.wav", "text": "THE CHILD ALMOST HURT THE SMALL DOG"},
        {"key": "gone", "image": "media/missing.jpg", "text": "nothing here"},
        {"key": "a.b", "text": "dotted key"},
        {"key": "weights", "audio": "media/weights.pt"},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        "\n".join(json.dumps(line) for line in lines[:2])
        + "\n{not json\n"
        + "\n".join(json.dumps(line) for line in lines[2:])
        + "\n"
    )
    records, quarantine = records_and_quarantine(ingest(tmp_path, "ingest.source=jsonl", f"ingest.path={manifest}"))
    assert set(records) == {"ironing", "manifest-00000002"}
    assert json.loads(records["ironing"]["json"]) == {"question": "what colour is the car?", "answer": "yellow"}
    assert records["manifest-00000002"]["audio"] == (fixtures_dir / "audio" / "spk1_snt1.wav").read_bytes()
    assert sorted(q["reason"] for q in quarantine) == [
        "invalid_key",
        "invalid_manifest_line",
        "missing_file",
        "pickle_member",
    ]
    assert len(records) + len(quarantine) == 6


def test_a_manifests_fingerprint_follows_its_lines_and_media_not_its_folder(tmp_path):
    """A manifest in the folder a user runs from: the pipeline's own outputs (runs/, the MLflow
    store) land beside it while it runs; they must not change ingest's identity, so that
    `crossmodal stages` shows the identity the run then uses and a re-run reuses ingest."""
    from pipelines.config.ingest import IngestConfig
    from pipelines.stages.ingest import source_fingerprint

    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "a.wav").write_bytes(b"RIFF-one")
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"key": "a", "audio": "media/a.wav", "text": "a hum"}) + "\n")
    cfg = IngestConfig(source="jsonl", path=str(manifest))
    before = source_fingerprint(cfg)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mlflow.db").write_bytes(b"written while the pipeline runs")
    (tmp_path / "notes.txt").write_text("not named by the manifest")
    assert source_fingerprint(cfg) == before
    (tmp_path / "media" / "a.wav").write_bytes(b"RIFF-two, longer")  # a clip the manifest names changed
    changed = source_fingerprint(cfg)
    assert changed != before
    manifest.write_text(manifest.read_text() + json.dumps({"key": "b", "text": "another"}) + "\n")
    assert source_fingerprint(cfg) not in (before, changed)


def test_a_shard_that_cannot_be_read_is_one_quarantine_line_not_a_failed_stage(tmp_path):
    """A link to a missing file or a link loop: the filesystem listing would leave it out."""
    import os

    from pipelines.config.ingest import IngestConfig
    from pipelines.stages.ingest import Unit, shard_files, unit_samples

    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "good.tar", "w") as archive:
        info = tarfile.TarInfo("s1.txt")
        info.size = 4
        archive.addfile(info, __import__("io").BytesIO(b"text"))
    os.symlink(tmp_path / "gone" / "x.tar", folder / "missing.tar")
    os.symlink("loop.tar", folder / "loop.tar")
    files = shard_files(Storage(str(folder)))
    assert [posixpath.basename(f) for f in files] == ["good.tar", "loop.tar", "missing.tar"]
    cfg = IngestConfig(source="shards", path=str(folder))
    found = {posixpath.basename(f): list(unit_samples(Unit(0, "shards", [f]), cfg)) for f in files}
    assert [s["key"] for s in found["good.tar"]] == ["s1"]
    for name in ("loop.tar", "missing.tar"):
        [rejected] = found[name]
        assert (rejected.key, rejected.reason, rejected.source) == ("", "unreadable_shard", files[0][:-8] + name)
