"""A user's own data through every stage, ingest to evaluate, on real Ray, DeepSpeed and MLflow:
pictures with captions only, clips with transcripts only, and both kinds of sample (never a
three-way one) without questions, run with the demo's config as a new user would. Not the demo
world: captions with their own words, no questions. Each kind checks that the metrics and
plots are the ones its data allows and that what is skipped is said, once."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from pipelines.config import load_config
from pipelines.runner import run_pipeline
from pipelines.scaffold import render
from pipelines.survey import survey
from tests.conftest import DEMO_CONFIG, NO_COMPRESSION, TINY_TRAIN
from tests.pipelines import own_data

QUICK = TINY_TRAIN


def run_kind(tmp_path, kind: str, config, *extra: str, samples: int = 60):
    manifest = own_data.write(tmp_path / "data", kind, samples, seed=5)
    if config is None:  # `crossmodal init`
        config = tmp_path / f"{kind}.yaml"
        config.write_text(render(survey(manifest), kind))
    where = [f"storage.root={tmp_path / 'storage'}", f"mlflow.local_store={tmp_path / 'runs'}"]
    cfg = load_config(config, [f"ingest.path={manifest}", *where, *QUICK, *extra])
    lines = []
    outcome = run_pipeline(cfg, echo=lines.append)
    assert outcome.status == "FINISHED", outcome.failure
    client = MlflowClient(outcome.tracking_uri)
    return outcome, client, {s.name: client.get_run(s.run_id) for s in outcome.stages}


def summary(client, run) -> dict:
    return json.load(open(client.download_artifacts(run.info.run_id, "stage_result.json")))["summary"]


@pytest.mark.parametrize(
    "kind, present, absent",
    [("image_text", "image", "audio"), ("audio_text", "audio", "image")],
)
def test_one_kind_of_sample_from_init_to_evaluate(tmp_path, ray_cluster, kind, present, absent):
    outcome, client, runs = run_kind(tmp_path, kind, None)
    metrics = runs["evaluate"].data.metrics
    assert f"retrieval.text_to_{present}.r1" in metrics and f"retrieval.{present}_to_text.r1" in metrics
    assert 0 < metrics[f"retrieval.{present}_to_text.hub_share"] <= 1
    assert metrics[f"caption.{present}.samples"] > 0
    assert not [k for k in metrics if absent in k or k.startswith("vqa.")], sorted(metrics)
    assert f"retrieval.text_to_{present}.wrong_top1" in metrics and not [k for k in metrics if ".confused." in k]
    notes = summary(client, runs["evaluate"])["skipped"]
    assert notes == [
        f"no {absent} in the test split: retrieval to and from {absent} and captions from it skipped",
        "no questions in the test split: VQA skipped",
    ]
    assert summary(client, runs["prepare"])["warnings"] == []  # init's config fits its data
    assert summary(client, runs["train"])["warnings"] == []
    plots = {a.path for a in client.list_artifacts(runs["evaluate"].info.run_id, "plots")}
    assert {"plots/similarity.png", "plots/recall_at_k.png", "plots/examples.png"} <= plots


def test_both_kinds_without_questions_under_the_demo_config(tmp_path, ray_cluster):
    """What a new user tried first: the demo's config with `ingest.source=jsonl`. It runs to the
    end; every setting of prepare that does not fit the data is a warning naming its key (the
    train section's are checked in tests/pipelines/data/test_profile.py: VQA is off here, as
    `init` would set it, so that no task touches every tower on every rank)."""
    # Two workers and micro-batches of 2: a batch with no image on one rank and one on the other
    # (a tower without a gradient on one rank only made ZeRO-2's reduction abort the process
    # before ObjectiveModule.every_parameter).
    overrides = (
        *NO_COMPRESSION,
        "ingest.source=jsonl",
        "prepare.max_audio_seconds=2.0",
        "shard.splits={train: 0.7, val: 0.1, test: 0.2}",
        "train.losses.vqa=0",
        "train.workers=2",
        "train.micro_batch=2",
        "train.max_steps=12",
        "train.val_every=6",
        "train.checkpoint_every=12",
    )
    _, client, runs = run_kind(tmp_path, "mixed", DEMO_CONFIG, *overrides, samples=120)
    prepare = summary(client, runs["prepare"])["warnings"]
    assert [w.split(":")[0] for w in prepare] == [
        "prepare.balance.target",
        "prepare.augment.negatives.words_file",
        "prepare.max_audio_seconds",
    ], prepare
    assert "names image+text+audio, which the train split does not have" in prepare[0]
    assert summary(client, runs["train"])["warnings"] == []
    metrics = runs["evaluate"].data.metrics
    assert {
        "retrieval.image_to_text.r1",
        "retrieval.audio_to_text.r1",
        "caption.image.cider",
        "caption.audio.cider",
    } <= set(metrics)
    assert not [k for k in metrics if k.startswith(("vqa.", "robustness.vqa", "retrieval.image_to_audio"))]
    assert summary(client, runs["evaluate"])["skipped"] == ["no questions in the test split: VQA skipped"]
