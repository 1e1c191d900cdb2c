"""`crossmodal init`: the survey of a user's data and the config written from it."""

from __future__ import annotations

import pytest
import yaml

from pipelines.cli import main
from pipelines.config import flatten, load_config
from pipelines.scaffold import audio_seconds, image_size, render, split_fractions
from pipelines.survey import SurveyError, survey
from tests.conftest import REPO
from tests.pipelines import own_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    return {kind: own_data.write(root / kind, kind, 90, seed=3) for kind in own_data.KINDS}


def written(data, kind, tmp_path):
    path = tmp_path / f"{kind}.yaml"
    path.write_text(render(survey(data[kind]), kind))
    return load_config(path)


def test_pictures_with_captions(data, tmp_path):
    cfg = written(data, "image_text", tmp_path)
    found = survey(data["image_text"])
    assert found.combinations == {"image+text": 90} and found.total == 90
    assert cfg.prepare.image_size == 128  # short sides 120-200 px: the largest size under the median
    assert cfg.prepare.balance.target is None  # one kind of sample
    assert (cfg.train.losses.contrastive, cfg.train.losses.caption, cfg.train.losses.vqa) == (1.0, 1.0, 0.0)
    assert cfg.train.model.overrides["patch_size"] == 32  # a 4x4 map at 128 px


def test_clips_with_transcripts(data, tmp_path):
    cfg = written(data, "audio_text", tmp_path)
    found = survey(data["audio_text"])
    assert set(found.audio_rates) == {8000, 16000}
    assert cfg.prepare.sample_rate in (8000, 16000)
    # Clips of 1.5-4 s: cropped at the 90th percentile, rounded up to half a second.
    assert 3.5 <= cfg.prepare.max_audio_seconds <= 4.0 == audio_seconds([4.0])
    assert cfg.prepare.max_audio_seconds >= sorted(found.audio_seconds)[int(0.9 * len(found.audio_seconds)) - 1]


@pytest.mark.parametrize("kind, vqa, answers", [("mixed", 0.0, 1), ("mixed_qa", 1.0, 6)])
def test_both_kinds_of_sample_with_and_without_questions(data, tmp_path, kind, vqa, answers):
    cfg = written(data, kind, tmp_path)
    assert cfg.prepare.balance.target == {"image+text": 0.5, "text+audio": 0.5}
    assert cfg.train.losses.vqa == vqa and cfg.prepare.max_answers <= answers
    assert cfg.ingest.source == "jsonl" and cfg.ingest.path == str(data[kind])


def test_splits_leave_val_and_test_enough_samples():
    assert split_fractions(20_000) == {"train": 0.92, "val": 0.03, "test": 0.05}
    small = split_fractions(600)
    assert round(600 * small["test"]) >= 100 and round(600 * small["val"]) >= 50
    assert split_fractions(16) == {"train": 0.75, "test": 0.25}  # too few for a val split
    assert all(abs(sum(split_fractions(n).values()) - 1) < 1e-9 for n in (16, 100, 600, 2068, 20_000))
    assert image_size([50, 60]) == 48 and image_size([300]) == 128 and image_size([20]) == 32


def test_init_writes_a_config_that_runs_and_explains_itself(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init", str(data["mixed"].parent)]) == 0  # a folder: files grouped by key
    out = capsys.readouterr().out
    written = tmp_path / "mixed.yaml"
    assert f"wrote {written.name}" in out and "next: crossmodal run mixed.yaml" in out
    text = written.read_text()
    assert "# median short side" in text and "# 90th percentile of 30 clips" in text
    assert load_config(written).ingest.source == "folder"
    assert main(["init", str(data["mixed"].parent)]) == 2  # no overwrite without --force
    assert "exists (pass --force" in capsys.readouterr().err
    assert main(["init", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip().endswith("nowhere: no such file or folder")


def test_a_folder_nobody_can_read_is_named_as_such_not_as_missing(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)  # unreadable even for root, unlike chmod 000
    with pytest.raises(SurveyError, match=r"loop: cannot read it \(Too many levels of symbolic links\)"):
        survey(loop)


def test_an_empty_folder_is_one_line(tmp_path):
    with pytest.raises(SurveyError, match="the folder has no files"):
        survey(tmp_path)


def test_the_template_has_the_keys_init_writes(data, tmp_path):
    template = yaml.safe_load((REPO / "pipelines" / "configs" / "own_data.yaml").read_text())
    mine = yaml.safe_load(render(survey(data["mixed"]), "mixed"))
    assert set(flatten(template)) == set(flatten(mine))
    load_config(REPO / "pipelines" / "configs" / "own_data.yaml")
