"""The data profile and the settings that do not fit it (pipelines/data/profile.py)."""

from __future__ import annotations

from pipelines.config import load_config
from pipelines.config.train import Losses
from pipelines.data.profile import data_profile, prepare_findings, skipped_parts, train_findings
from tests.conftest import DEMO_CONFIG


def row(split, combo, caption="", question="", answer="", seconds=0.0):
    return {
        "split": split,
        "combo": combo,
        "caption": caption,
        "question": question,
        "answer": answer,
        "audio_seconds": seconds,
    }


ROWS = (
    [row("train", "image+text", "teal stripes over coral dots") for _ in range(6)]
    + [row("train", "text+audio", "a long steady low hum", seconds=s) for s in (2.0, 3.0, 3.5, 4.0)]
    + [row("test", "image+text", "olive rings")]
)


def test_the_profile_counts_what_the_train_split_holds():
    profile = data_profile(ROWS)
    assert profile["samples"] == {"train": 10, "test": 1}
    assert profile["combinations"] == {"image+text": 6, "text+audio": 4}
    assert profile["modalities"] == {"image": 6, "text": 10, "audio": 4}
    assert profile["questions"] == 0
    assert profile["audio_seconds"]["p50"] == 3.25 and profile["audio_seconds"]["max"] == 4.0
    assert profile["caption_words"]["max"] == 5.0


def test_the_demo_settings_on_someone_elses_data_are_warnings_naming_their_keys():
    cfg = load_config(DEMO_CONFIG)  # balance target with image+text+audio, negatives, a 1 s crop
    found = prepare_findings(cfg.prepare, data_profile(ROWS), negatable=0)
    assert [f.key for f in found] == [
        "prepare.balance.target",
        "prepare.augment.negatives.words_file",
        "prepare.max_audio_seconds",
    ]
    assert str(found[2]) == "prepare.max_audio_seconds: 1 s crops most clips (median 3.25 s, 90th percentile 3.85 s)"
    assert prepare_findings(cfg.prepare, data_profile(ROWS), negatable=3)[1].key != found[1].key  # words occur


def test_a_loss_for_a_task_no_sample_has_is_named_once():
    profile = data_profile(ROWS)
    found = train_findings(load_config(DEMO_CONFIG).train.losses, profile)  # vqa 2, no questions
    assert [str(f) for f in found] == [
        "train.losses.vqa: 2, but the train split has no questions with answers: it is not trained"
    ]
    images_only = data_profile([row("train", "image", "") for _ in range(3)])
    keys = {f.key for f in train_findings(Losses(), images_only)}
    assert keys == {
        f"train.losses.{k}"
        for k in ("contrastive", "matching", "masked_text", "masked_audio", "caption", "answer", "vqa")
    }


def test_what_an_evaluation_skips_is_said_in_one_line_each():
    assert skipped_parts({"image": 0, "text": 5, "audio": 5}, questions=0, split="test") == [
        "no image in the test split: retrieval to and from image and captions from it skipped",
        "no questions in the test split: VQA skipped",
    ]
    assert skipped_parts({"image": 1, "text": 1, "audio": 1}, questions=2, split="test") == []
