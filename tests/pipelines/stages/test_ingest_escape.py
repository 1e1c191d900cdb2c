"""Paths from a manifest or a folder source never escape the data root: such a sample is
quarantined with `path_outside_root`, naming its key, and the file is never read."""

from __future__ import annotations

import json
import os

from pipelines.config.ingest import IngestConfig
from pipelines.data.wds_reader import Rejected
from pipelines.stages.ingest import folder_groups, manifest_media, manifest_sample, plan_units, unit_samples
from pipelines.storage import Storage

LIMIT = 1 << 20


def test_manifest_paths_outside_its_folder_are_quarantined(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "secret"
    (data / "media").mkdir(parents=True)
    outside.mkdir()
    (outside / "key.wav").write_bytes(b"not yours")
    (data / "media" / "link.wav").symlink_to(outside / "key.wav")
    manifest = data / "manifest.jsonl"
    entries = {
        "dotdot": {"key": "dotdot", "audio": "../secret/key.wav", "text": "a"},
        "absolute": {"key": "absolute", "audio": str(outside / "key.wav"), "text": "a"},
        "symlink": {"key": "symlink", "audio": "media/link.wav", "text": "a"},
        "passwd": {"key": "passwd", "image": "../../../../../../etc/passwd", "text": "a"},
    }
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries.values()))
    for line_no, (key, entry) in enumerate(entries.items(), start=1):
        got = manifest_sample(str(manifest), line_no, entry, LIMIT)
        assert isinstance(got, Rejected), key
        assert (got.key, got.reason) == (key, "path_outside_root")
        assert "outside the data root" in got.detail
    assert manifest_media(Storage(str(manifest))) == []  # not even listed in source_index.json


def test_a_symlink_out_of_a_folder_source_is_quarantined(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "secret"
    data.mkdir(), outside.mkdir()
    (outside / "x.txt").write_text("not yours")
    (data / "good.txt").write_text("a caption")
    os.symlink(outside / "x.txt", data / "bad.txt")
    cfg = IngestConfig(source="folder", path=str(data))
    units, _ = plan_units(cfg)
    assert sorted(key for key, _ in folder_groups(Storage(str(data)))) == ["bad", "good"]
    got = {getattr(item, "key", None) or item["key"]: item for unit in units for item in unit_samples(unit, cfg)}
    assert isinstance(got["bad"], Rejected) and got["bad"].reason == "path_outside_root"
    assert not isinstance(got["good"], Rejected)
