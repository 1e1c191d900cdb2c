"""The compression half of the DAG on real Ray Train, DeepSpeed and MLflow, at tiny sizes:
distill -> prune -> quantize -> register after train and evaluate, killed during prune and run
again. What each library part does is tested beside it (tests/model/test_prune.py,
test_distill.py, tests/pipelines/compression/); here: that the stages chain, reuse, score,
measure and register."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from model.io import load
from pipelines.compression.folder import load_any
from pipelines.config import load_config
from pipelines.runner import run_pipeline
from pipelines.storage import Storage
from tests.conftest import DEMO_CONFIG, stop_group

NARROW = {"width": 32, "depth": 1, "heads": 2}
STUDENT = {
    "embed_dim": 32,
    "text": NARROW,
    "image": {"width": 32, "depth": 2, "heads": 2},
    "audio": NARROW,
    "fusion_tower": NARROW,
    "decoder": NARROW,
}
LOOP = ["workers=2", "precision=fp32", "micro_batch=16", "warmup_steps=2", "max_minutes=null", "val_every=100"]
LOSSES = (
    "{contrastive: 1.0, matching: 0.0, masked_text: 0.0, masked_image: 0.0, masked_audio: 0.0, "
    "caption: 1.0, answer: 0.0, vqa: 1.0}"
)


def overrides(root: Path) -> list[str]:
    return [
        f"storage.root={root / 'storage'}",
        f"mlflow.local_store={root / 'runs'}",
        "ingest.demo.num_samples=400",
        "ingest.samples_per_part=200",
        "shard.samples_per_shard=64",
        "shard.splits={train: 0.8, val: 0.1, test: 0.1}",
        "prepare.image_size=32",
        "prepare.preview_samples=2",
        "train.model.size=tiny",
        "train.model.image_encoder=vit",
        "train.model.overrides={}",
        "train.max_steps=8",
        f"train.losses={LOSSES}",
        *(f"train.{setting}" for setting in LOOP),
        "distill.model.overrides=" + json.dumps(STUDENT),
        "distill.max_steps=6",
        f"distill.losses={LOSSES}",
        *(f"distill.{setting}" for setting in LOOP),
        "prune.max_steps=4",
        f"prune.losses={LOSSES}",
        "prune.calibration_batches=2",
        *(f"prune.{setting}" for setting in LOOP),
        "distill.measure.repeats=3",
        "prune.measure.repeats=3",
        "quantize.measure.repeats=3",
        "quantize.max_recall_drop=1.0",  # ten training steps: recall is noise; the choice is by latency
    ]


def killed_during_prune(root: Path) -> list[str]:
    """`crossmodal run` in a process of its own, killed (the whole process group) as soon as
    the prune stage starts; the lines it printed."""
    args = [arg for o in overrides(root) for arg in ("--set", o)]
    process = subprocess.Popen(
        [sys.executable, "-m", "pipelines", "run", str(DEMO_CONFIG), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=root,
    )
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if line.startswith("[prune] running"):
                break
    finally:
        stop_group(process)
    assert any(line.startswith("[prune] running") for line in seen), "".join(seen[-30:])
    return seen


@pytest.mark.slow
@pytest.mark.spawn
def test_killed_during_prune_then_run_again_reuses_what_finished_and_registers(tmp_path, ray_cluster):
    printed = killed_during_prune(tmp_path)
    assert any(line.startswith("[distill] ran") for line in printed)
    outcome = run_pipeline(load_config(DEMO_CONFIG, overrides(tmp_path)), echo=lambda line: None)
    assert outcome.status == "FINISHED", outcome.failure
    states = {s.name: s.state for s in outcome.stages}
    assert states == {
        **dict.fromkeys(("ingest", "shard", "prepare", "train", "evaluate", "distill"), "reused"),
        **dict.fromkeys(("prune", "quantize", "register"), "ran"),
    }
    client = MlflowClient(outcome.tracking_uri)
    runs = {s.name: s.run_id for s in outcome.stages}

    # prune: smaller matrices that load with the model library's own load()
    pruned = load(Storage(outcome.by_name()["prune"].output_uri).child("model").local_copy()).model
    assert pruned.cfg.text.heads == 1 and pruned.cfg.text.mlp_hidden == 64
    assert pruned.encoders["text"].stack.blocks[0].attn.qkv.weight.shape == (3 * 16, 32)
    metrics = client.get_run(runs["prune"]).data.metrics
    assert metrics["pruned.parameters"] < 0.8 * metrics["student.parameters"]
    assert metrics["recovery_steps"] == 4

    # quantize: both routes measured; the kept one is the fastest, stored without pickle
    quantize = client.get_run(runs["quantize"]).data.metrics
    for route in ("torch_int8", "onnx_int8"):
        # At this size the tokenizer and config are a large share of the folder (0.61x measured).
        assert quantize[f"{route}.size_mb"] < 0.75 * quantize["pruned.size_mb"]
        assert quantize[f"{route}.latency_b32_ms"] > 0 and f"{route}.retrieval.text_to_image.r1" in quantize
    routes_file = client.download_artifacts(runs["quantize"], "tables/routes.json", str(tmp_path))
    routes = json.loads(Path(routes_file).read_text())
    kept = [row for row in routes["data"] if row[routes["columns"].index("kept")]]
    assert len(kept) == 1

    # register: the alias, its tags, the report; the registered model answers through pyfunc
    version = client.get_model_version_by_alias("crossmodal", "challenger")
    assert version.tags["crossmodal.pipeline_run"] == outcome.run_id
    assert version.tags["crossmodal.config_hash"]
    assert "metric.retrieval.text_to_image.r1" in version.tags  # headline figures only
    assert not [tag for tag in version.tags if tag.endswith((".r5", ".r10", ".hub_share"))]
    trained = version.tags["crossmodal.trained_model"]  # the float model a warm start fine-tunes
    assert trained.startswith(outcome.by_name()["train"].output_uri) and trained.endswith("/model")
    artifacts = {a.path for a in client.list_artifacts(runs["register"], "plots")}
    assert "plots/compression.png" in artifacts
    report = Path(client.download_artifacts(runs["register"], "compression.md", str(tmp_path))).read_text()
    assert all(name in report for name in ("teacher", "student", "pruned"))
    import mlflow

    mlflow.set_tracking_uri(outcome.tracking_uri)
    served = mlflow.pyfunc.load_model("models:/crossmodal@challenger")
    out = served.predict([{"task": "embed", "text": "a red circle"}])
    assert len(out["text_embedding"][0]) == 32
    registered = load_any(
        Storage(outcome.by_name()["quantize"].output_uri).child(routes_kept(kept, routes)).local_copy()
    )
    with torch.no_grad():
        assert registered.model.cfg.embed_dim == 32


def routes_kept(kept: list, routes: dict) -> str:
    return kept[0][routes["columns"].index("route")]
