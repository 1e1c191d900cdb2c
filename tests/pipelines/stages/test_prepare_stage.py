"""The prepare stage in the DAG: MLflow shows quarantine and previews; a Ray Train job consumes it."""

from __future__ import annotations

import json

import pytest
import torch
from mlflow import MlflowClient

from model.config import model_config
from model.multimodal import CrossModalModel
from model.objectives import MultiTaskObjective
from pipelines.config import load_config
from pipelines.data.collate import to_model_batch
from pipelines.data.dataset import DatasetSpec, build_dataset
from pipelines.runner import run_pipeline
from pipelines.storage import Storage
from tests.conftest import DEMO_CONFIG, small_overrides
from tests.pipelines.data.prepare_helpers import crafted_shard

DECODE_REASONS = ("truncated_image", "undecodable_text", "bad_audio_header", "nonfinite_audio")


@pytest.fixture
def prepared(tmp_path, ray_cluster):
    """User shards with decode-level problems (ingest lets them through, prepare must catch them)
    plus the demo world, through ingest, shard and prepare."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    crafted_shard(theirs / "crafted.tar", reasons=DECODE_REASONS)
    cfg = load_config(
        DEMO_CONFIG,
        small_overrides(tmp_path)
        + [
            "ingest.source=shards",
            f"ingest.path={theirs}",
            "shard.splits={train: 1.0}",
            "prepare.image_size=32",
            "prepare.preview_samples=4",
        ],
    )
    outcome = run_pipeline(cfg, only=["ingest", "shard", "prepare"], echo=lambda line: None)
    assert outcome.status == "FINISHED", outcome.failure
    return outcome


def test_quarantine_and_previews_in_the_stage_run(prepared):
    client = MlflowClient(prepared.tracking_uri)
    run = client.get_run(prepared.by_name()["prepare"].run_id)
    metrics = run.data.metrics
    for reason in DECODE_REASONS:
        assert metrics[f"quarantined.{reason}"] == 1
    assert metrics["samples_in"] == metrics["samples_usable"] + metrics["quarantined"] == 9
    table = json.load(open(client.download_artifacts(run.info.run_id, "tables/quarantine.json")))
    assert sorted(row[table["columns"].index("reason")] for row in table["data"]) == sorted(DECODE_REASONS)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/augmentation_preview.png", "plots/balance.png"}
    preview = client.download_artifacts(run.info.run_id, "plots/augmentation_preview.png")
    assert open(preview, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    texts = json.load(open(client.download_artifacts(run.info.run_id, "tables/augmentation_texts.json")))
    assert texts["columns"] == ["key", "text_before", "text_after"] and len(texts["data"]) == 4
    out = Storage(prepared.by_name()["prepare"].output_uri)
    lines = out.read_bytes("quarantine.jsonl").decode().splitlines()
    assert sorted(json.loads(line)["reason"] for line in lines) == sorted(DECODE_REASONS)


@pytest.fixture
def prepared_demo(demo_config, ray_cluster):
    outcome = run_pipeline(demo_config, only=["ingest", "shard", "prepare"], echo=lambda line: None)
    assert outcome.status == "FINISHED", outcome.failure
    return outcome


def test_a_ray_train_job_consumes_the_stream(prepared_demo, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = Storage(prepared_demo.by_name()["prepare"].output_uri)
    spec = DatasetSpec(**out.read_json("dataset_spec.json"))
    expected = sum(out.read_json("balance.json")["after_epoch0"].values())
    size = spec.settings.image_size  # the model fits the prepared data (the demo's 96 px)
    cfg = model_config("tiny", vocab_size=1024, num_answers=len(spec.answers), image_size=size)

    def loop(config):
        import ray.train

        torch.manual_seed(0)
        model = CrossModalModel(config["cfg"])
        shard = ray.train.get_dataset_shard("train")
        seen, finite, combos = 0, True, set()
        for index, batch in enumerate(
            shard.iter_torch_batches(batch_size=16, local_shuffle_buffer_size=64, local_shuffle_seed=0)
        ):
            model_batch = to_model_batch(batch)
            if index == 0:  # the model takes the batch (the train stage's tests train on it for real)
                loss, _ = MultiTaskObjective()(model, model_batch)
                finite = bool(torch.isfinite(loss))
            seen += len(model_batch["weight"])
            combos |= {(bool(i), bool(a)) for i, a in zip(model_batch["has_image"], model_batch["has_audio"])}
            assert model_batch["image"].shape[1:] == (3, size, size) and model_batch["image"].dtype == torch.float32
        rank = ray.train.get_context().get_world_rank()
        with open(f"{config['out']}/seen-{rank}.json", "w") as f:
            json.dump({"seen": seen, "finite": finite, "combos": sorted(combos)}, f)

    result = TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        datasets={"train": build_dataset(spec, "train")},
        run_config=RunConfig(name="consumer", storage_path=str(tmp_path / "ray_results")),
    ).fit()
    assert result.error is None
    reports = [json.load(open(tmp_path / f"seen-{rank}.json")) for rank in (0, 1)]
    assert all(r["finite"] for r in reports)
    assert expected - 2 <= sum(r["seen"] for r in reports) <= expected  # an equal split may drop a row
    assert {tuple(c) for r in reports for c in r["combos"]} == {(True, True), (True, False), (False, True)}
