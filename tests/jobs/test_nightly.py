"""The nightly retrain end to end on real Ray, DeepSpeed and MLflow, on a user's folder of
pictures with captions: the first night trains, registers, freezes the benchmark and promotes;
a night with nothing new trains nothing; a night with new files trains again, leaves the frozen
benchmark as it was, and the gate keeps the champion when the challenger does not win by the
margin, saying why."""

from __future__ import annotations

import json
import shutil

import pytest
from mlflow import MlflowClient

from jobs.nightly import run_nightly
from pipelines.scaffold import render
from pipelines.survey import survey
from tests.pipelines import own_data
from tests.pipelines.stages.test_own_data import QUICK

NIGHT = [
    *QUICK,
    "distill.enabled=false",
    "prune.enabled=false",
    "quantize.enabled=false",
    "registry.enabled=true",
    "registry.source=train",
    "nightly.lease_seconds=60",
]


def as_folder(manifest, folder, first: int, count: int) -> None:
    """Samples first .. first+count of a generated manifest as a folder source (key.png + key.txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = manifest.read_text().splitlines()[first : first + count]
    for entry in map(json.loads, lines):
        image = manifest.parent / entry["image"]
        shutil.copy(image, folder / f"{entry['key']}{image.suffix}")
        (folder / f"{entry['key']}.txt").write_text(entry["text"])


@pytest.mark.slow
@pytest.mark.ray
def test_three_nights(tmp_path, ray_cluster):
    manifest = own_data.write(tmp_path / "generated", "image_text", 100, seed=7)
    source = tmp_path / "source"
    as_folder(manifest, source, 0, 70)
    config = tmp_path / "pictures.yaml"
    config.write_text(render(survey(source), "pictures"))
    where = [f"storage.root={tmp_path / 'storage'}", f"mlflow.local_store={tmp_path / 'runs'}"]
    overrides = [*where, *NIGHT]
    said: list[str] = []

    first = run_nightly(str(config), overrides, echo=said.append, date="2026-12-01")
    assert (first.state, first.version, first.champion) == ("promoted", 1, 1), first.message
    assert "no crossmodal@champion yet: training the first one" in "\n".join(said)
    manifest_file = tmp_path / "storage" / "benchmark" / "crossmodal" / "benchmark.json"
    frozen = json.loads(manifest_file.read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    client._registry_uri = client.tracking_uri  # the registry lives in the same store
    version = client.get_model_version_by_alias("crossmodal", "champion")
    assert int(version.version) == 1 and version.tags["crossmodal.gate"] == "promoted"
    assert version.tags["crossmodal.benchmark"] == frozen["content_hash"]
    parent = client.get_run(first.run_id)
    assert parent.info.run_name == "nightly 2026-12-01"
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    said.clear()
    second = run_nightly(str(config), overrides, echo=said.append, date="2026-12-02")
    assert second.state == "no_new_data" and second.champion == 1
    assert "nothing new since crossmodal version 1 (champion) was trained on 140 source files" in second.message
    assert client.get_run(second.run_id).info.run_name == "nightly 2026-12-02"
    assert len(client.search_model_versions("name = 'crossmodal'")) == 1  # nothing trained, nothing registered

    as_folder(manifest, source, 70, 30)  # 30 new pictures arrive
    said.clear()
    impossible = "nightly.gate.metrics={retrieval.text_to_image.r1: 1.0}"
    warm = "nightly.warm_start=true"
    third = run_nightly(str(config), [*overrides, impossible, warm], echo=said.append, date="2026-12-03")
    assert "60 new or changed source files since version 1 was trained: training" in "\n".join(said)
    assert "nightly: warm start: train starts from models:/crossmodal/1" in said
    assert (third.state, third.version, third.champion) == ("kept", 2, 1), third.message
    assert "retrieval.text_to_image.r1" in third.message and "needs >=" in third.message
    assert json.loads(manifest_file.read_text()) == frozen  # new data never changes the benchmark
    assert int(client.get_model_version_by_alias("crossmodal", "champion").version) == 1
    assert int(client.get_model_version_by_alias("crossmodal", "challenger").version) == 2
    assert client.get_model_version("crossmodal", "2").tags["crossmodal.gate"] == "kept"
    # The warm start fine-tuned version 1's float model (the train stage's, named by its tag).
    [train] = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{third.run_id}' and tags.`crossmodal.stage` = 'train'",
    )
    assert train.data.params["train.init_from"] == "models:/crossmodal/1"
    assert version.tags["crossmodal.trained_model"].endswith("/model")
    [gate] = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{third.run_id}' and tags.`crossmodal.kind` = 'gate'"
    )
    assert gate.info.run_name == "gate" and gate.data.tags["crossmodal.gate.decision"] == "kept"
    assert {"challenger.retrieval.text_to_image.r1", "champion.retrieval.text_to_image.r1"} <= set(gate.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(gate.info.run_id)} | {
        a.path for a in client.list_artifacts(gate.info.run_id, "plots")
    }
    assert {"gate.md", "figures.json", "gate_checks.json", "plots/gate.png"} <= artifacts
