"""The train stage on real Ray Train + DeepSpeed (2 CPU workers) with a real MLflow store.

One small demo world is ingested, sharded and prepared once for the module; each test then
runs the pipeline again with its own train settings (the data stages are reused by identity).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from model.io import load
from pipelines.config import load_config
from pipelines.runner import run_pipeline
from pipelines.storage import Storage
from tests.conftest import DEMO_CONFIG, NO_COMPRESSION

TINY = [
    "train.model.size=tiny",
    "train.model.image_encoder=vit",
    "train.model.overrides={}",
    "train.workers=2",
    "train.zero_stage=2",
    # fp32: on a CPU without native bf16 (no AVX512-BF16) a bf16 step is ~10x slower (measured
    # on one machine of this kind: `small` ZeRO-2, 1.56 s fp32 against 15.3 s bf16). bf16 on
    # DeepSpeed is covered by tests/pipelines/training/test_loop_resume.py and test_engine.py.
    "train.precision=fp32",
    "train.micro_batch=16",
    "train.lr=3e-3",
    "train.warmup_steps=5",
    "train.max_minutes=null",
    "train.log_every=1",
    "train.val_every=10",
    "train.shuffle_buffer=64",
    "train.losses.matching=0.5",
    "train.losses.masked_text=0.5",
    "train.losses.caption=0.5",
]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory, ray_cluster):
    """A folder whose store already holds the ingested, sharded and prepared demo world."""
    root = tmp_path_factory.mktemp("train")
    outcome = run_pipeline(
        load_config(DEMO_CONFIG, overrides(root)), only=["ingest", "shard", "prepare"], echo=lambda line: None
    )
    assert outcome.status == "FINISHED", outcome.failure
    root.joinpath("spec").write_text(outcome.by_name()["prepare"].output_uri)
    return root


def overrides(root, *extra: str) -> list[str]:
    return [
        f"storage.root={root / 'storage'}",
        f"mlflow.local_store={root / 'runs'}",
        "ingest.demo.num_samples=700",
        "ingest.samples_per_part=350",
        "shard.samples_per_shard=64",
        "shard.splits={train: 0.8, val: 0.1, test: 0.1}",
        "prepare.image_size=32",
        "prepare.preview_samples=2",
        *NO_COMPRESSION,
        *TINY,
        *extra,
    ]


def run(root, *extra: str, **options):
    outcome = run_pipeline(load_config(DEMO_CONFIG, overrides(root, *extra)), echo=lambda line: None, **options)
    assert outcome.status == "FINISHED", outcome.failure
    return outcome, MlflowClient(outcome.tracking_uri)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def stage_runs(client, outcome, name: str):
    parent = outcome.run_id
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    return [r for r in runs if r.info.run_name == name]


def test_zero2_learns_and_logs_one_stage_run(demo_root):
    outcome, client = run(demo_root, "train.max_steps=20", "train.checkpoint_every=10")
    [train_run] = stage_runs(client, outcome, "train")  # one run, written by rank 0 only
    run_id = train_run.info.run_id
    assert train_run.info.run_id == outcome.by_name()["train"].run_id

    losses = history(client, run_id, "loss.total")
    assert [step for step, _ in losses] == list(range(1, 21))  # one point per optimizer step, no duplicates
    first, last = sum(v for _, v in losses[:5]) / 5, sum(v for _, v in losses[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    for task in ("contrastive", "matching", "masked_text", "caption", "vqa"):
        assert len(client.get_metric_history(run_id, f"loss.{task}")) == 20
    # Validation scores with the evaluate stage's code (pipelines/evaluation), its cheap parts.
    assert [step for step, _ in history(client, run_id, "val.retrieval.text_to_image.r1")] == [10, 20]
    assert 0 <= history(client, run_id, "val.vqa.image_audio.exact")[-1][1] <= 1
    assert history(client, run_id, "val.caption.loss")[-1][1] > 0
    assert all(v > 0 for _, v in history(client, run_id, "samples_per_s"))
    assert history(client, run_id, "lr")[0][1] < history(client, run_id, "lr")[4][1]  # warm-up
    epochs = [value for _, value in history(client, run_id, "epoch")]  # demo.yaml: 8 epochs in one stream pass
    assert epochs == sorted(epochs) and epochs[0] == 0 and epochs[-1] >= 1, epochs

    ds_config = json.load(open(client.download_artifacts(run_id, "deepspeed_config.json")))
    assert ds_config["zero_optimization"]["stage"] == 2 and not ds_config["bf16"]["enabled"]
    assert ds_config["train_batch_size"] == 32  # 16 per worker x 2 workers

    metrics = client.get_run(run_id).data.metrics
    assert metrics["steps"] == 20 and not [k for k in metrics if k.startswith("test.")]  # the test split is evaluate's
    folder = client.download_artifacts(run_id, "model")
    saved = load(folder)
    assert saved.model.cfg.size == "tiny"
    assert all(torch.isfinite(p).all() for p in saved.model.parameters())


def test_evaluate_stage_scores_the_model_with_metrics_plots_and_a_table(demo_root):
    outcome, client = run(demo_root, "train.max_steps=20", "train.checkpoint_every=10")  # train reused
    [evaluate_run] = stage_runs(client, outcome, "evaluate")
    metrics = evaluate_run.data.metrics
    directions = [f"{a}_to_{b}" for a in ("text", "image", "audio") for b in ("text", "image", "audio") if a != b]
    for direction in directions:
        r1, r5, r10 = (metrics[f"retrieval.{direction}.r{k}"] for k in (1, 5, 10))
        assert 0 <= r1 <= r5 <= r10 <= 1 and metrics[f"retrieval.{direction}.mean_rank"] >= 1
    samples = int(metrics["samples"])
    assert 50 <= samples and 0 < metrics["retrieval.text_to_image.candidates"] <= samples
    for context in ("image", "audio", "image_audio"):
        assert 0 <= metrics[f"caption.{context}.bleu4"] <= 1 and metrics[f"caption.{context}.cider"] >= 0
        assert 0 <= metrics[f"vqa.{context}.exact"] <= 1 and metrics[f"vqa.{context}.questions"] > 0
        by_type = {kind: metrics[f"vqa.{context}.by_type.{kind}"] for kind in ("count", "colour", "shape", "position")}
        assert all(0 <= v <= 1 for v in by_type.values()), by_type
    asked = sum(metrics[f"vqa.questions_by_type.{kind}"] for kind in ("count", "colour", "shape", "position"))
    assert asked == metrics["vqa.image_audio.questions"]  # the demo asks only these four types
    wrong = metrics["retrieval.text_to_image.wrong_top1"]
    queries = metrics["retrieval.text_to_image.queries"]
    assert wrong == round(queries * (1 - metrics["retrieval.text_to_image.r1"]))
    if wrong:  # the demo world's captions parse: each wrong result differs somewhere, or is a twin
        shares = [metrics[f"retrieval.text_to_image.confused.{a}"] for a in ("count", "colour", "kind", "position")]
        assert sum(shares) + metrics["retrieval.text_to_image.confused.none"] >= 1
    for removed in ("image", "audio"):
        assert (
            f"robustness.caption.without_{removed}.cider" in metrics
            and f"robustness.vqa.without_{removed}.exact" in metrics
        )
    assert metrics["safety.captions.checked"] >= samples and metrics["safety.captions.blocked"] == 0
    # The first test's pipeline already ran this stage: this run reuses it, the plots live there.
    producer = evaluate_run.data.tags.get("crossmodal.reused_from", evaluate_run.info.run_id)
    artifacts = {a.path for a in client.list_artifacts(producer, "plots")}
    assert artifacts == {"plots/similarity.png", "plots/recall_at_k.png", "plots/examples.png"}
    for path in artifacts:
        assert open(client.download_artifacts(producer, path), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = json.load(open(client.download_artifacts(producer, "tables/examples.json")))
    assert {
        "reference_caption",
        "caption_from_image",
        "question",
        "reference_answer",
        "answer_from_image_audio",
    } <= set(table["columns"])

    # Any saved model folder, here the train stage's, gives the same scores; a filter rule that
    # hits every caption is counted and shows in the table.
    model = outcome.by_name()["train"].output_uri + "/model"
    again, client = run(
        demo_root,
        "train.max_steps=20",
        "train.checkpoint_every=10",
        f"evaluate.model={model}",
        "evaluate.safety.rules=['[a-z]']",
    )
    [rerun] = stage_runs(client, again, "evaluate")
    for direction in directions:
        assert rerun.data.metrics[f"retrieval.{direction}.r1"] == metrics[f"retrieval.{direction}.r1"]
    assert rerun.data.metrics["safety.captions.blocked"] > 0
    table = json.load(open(client.download_artifacts(rerun.info.run_id, "tables/examples.json")))
    column = table["columns"].index("caption_from_image")
    assert "[withheld by the content filter]" in [row[column] for row in table["data"]]


def test_a_rerun_of_the_pipeline_continues_from_the_latest_checkpoint(demo_root):
    """What a driver that died mid-training leaves: no finished train stage, but the same train
    identity, so the same Ray Train run name, whose checkpoints Ray restores. Made here from the
    first test's run (ended at step 20) by deleting that stage's output: the re-run starts at 20
    and trains no step again. A forced re-run starts over instead."""
    extra = ("train.max_steps=20", "train.checkpoint_every=10")
    reused, _ = run(demo_root, *extra, only=["train"])
    previous = Storage(reused.by_name()["train"].output_uri)
    previous.fs.delete_dir(previous.path())
    outcome, client = run(demo_root, *extra, only=["train"])
    run_id = outcome.by_name()["train"].run_id
    assert [value for _, value in history(client, run_id, "resumed_from_step")] == [20]
    assert history(client, run_id, "loss.total") == []
    saved = load(client.download_artifacts(run_id, "model"))
    assert all(torch.isfinite(p).all() for p in saved.model.parameters())

    forced, client = run(demo_root, *extra, only=["train"], force=True)
    run_id = forced.by_name()["train"].run_id
    assert [value for _, value in history(client, run_id, "resumed_from_step")] == [0]
    assert [step for step, _ in history(client, run_id, "loss.total")][0] <= 10


def test_a_killed_worker_resumes_from_its_checkpoint(demo_root):
    """Rank 1 is SIGKILLed at step 13; Ray Train replaces the group and training continues from
    the latest checkpoint (step 10 or 5), not from zero; the stage finishes with loadable weights."""
    outcome, client = run(
        demo_root,
        "train.max_steps=20",
        "train.checkpoint_every=5",
        "train.max_failures=1",
        "train.fault.rank=1",
        "train.fault.step=13",
        "train.val_every=100",
        only=["train"],
    )
    [train_run] = stage_runs(client, outcome, "train")
    run_id = train_run.info.run_id
    starts = [int(value) for _, value in history(client, run_id, "resumed_from_step")]
    # The newest checkpoint Ray had registered when the worker died: step 10, or step 5 if the
    # step-10 report was still in flight. Never zero, never past the kill.
    assert len(starts) == 2 and starts[0] == 0 and starts[1] in (5, 10), starts
    resumed = starts[1]
    steps = [step for step, _ in history(client, run_id, "loss.total")]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[:restart] == list(range(1, restart + 1)) and 12 <= restart <= 13  # rank 0 may log step 13
    assert steps[restart:] == list(range(resumed + 1, 21))  # from the checkpoint on to the end
    saved = load(client.download_artifacts(run_id, "model"))
    assert all(torch.isfinite(p).all() for p in saved.model.parameters())


@pytest.mark.spawn
def test_the_standalone_loop_trains_under_torchrun(demo_root, tmp_path):
    """No Ray, no MLflow, no webdataset installed (a GPU machine's image): torchrun starts 2
    processes that read the prepared shards themselves."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO, free_port

    absent = tmp_path / "absent"
    for name in ("ray", "mlflow", "webdataset"):  # importing any of them fails as if not installed
        (absent / name).mkdir(parents=True)
        (absent / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(absent), str(REPO)])}
    spec = Storage(demo_root.joinpath("spec").read_text()).child("dataset_spec.json").path()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "pipelines.training.standalone",
        "--spec",
        spec,
        "--config",
        str(DEMO_CONFIG),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "0",
        *[f"--set={o}" for o in TINY + ["train.max_steps=6", "train.checkpoint_every=3", "train.val_every=3"]],
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logged = [line for line in done.stdout.splitlines() if line.startswith("step ")]
    assert any(line.startswith("step 6:") and "loss.total" in line for line in logged), done.stdout[-2000:]
    assert "val.retrieval.text_to_image.r1" in done.stdout
    assert (tmp_path / "out" / "checkpoints" / "step6").is_dir()
    saved = load(tmp_path / "out" / "model")
    assert saved.extra["steps"] == 6


@pytest.mark.spawn
def test_the_gpu_benchmark_times_data_alone_and_the_loop_on_prepared_shards(demo_root):
    """benchmarks/gpu_step.py --spec on a CPU at the tiny size: every part a lent GPU's short run
    depends on (the loader to the device, the loop, the targets) runs here first."""
    import subprocess
    import sys

    from tests.conftest import REPO, free_port

    spec = Storage(demo_root.joinpath("spec").read_text()).child("dataset_spec.json").path()
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--device", "cpu", "--size", "tiny"]
    command += ["--batch", "4", "--steps", "1", "--warmup", "1", "--spec", spec, "--loop-steps", "4"]
    command += ["--loader-workers", "1", "--data-batches", "3", "--port", str(free_port())]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = {line.split("  ")[0].strip(): line for line in done.stdout.splitlines()}
    assert "samples/s" in lines["data alone, 1 workers"] and "TFLOP/s" in lines["loop, 1 workers"]
    assert "loop, 1 workers / AMP step:" in done.stdout and "ZeRO-2 bf16 / AMP step:" in done.stdout
    assert "no comparison with it in this run" in done.stdout  # no open_clip here: no anchor, no constant


def test_a_standalone_pass_of_two_epochs_reads_each_as_a_pass_of_one_would(demo_root):
    """`train.stream_epochs` without Ray: one DataLoader pass over epochs 3 and 4, each batch tagged."""
    from pipelines.training.standalone import ShardStream, read_spec

    spec = read_spec(Path(Storage(demo_root.joinpath("spec").read_text()).child("dataset_spec.json").path()))

    def rows(epoch: int, epochs: int) -> list[tuple[int, int, float]]:
        stream = ShardStream(spec, "train", rank=0, world=1, epoch=epoch, batch_size=64, train=True, epochs=epochs)
        return [
            (int(e), int(i), round(float(x), 4))
            for b in stream
            for e, i, x in zip(b["epoch"], b["sample_id"], b["image"].reshape(len(b["epoch"]), -1).sum(1))
        ]

    both = rows(3, 2)
    assert both == rows(3, 1) + rows(4, 1)
    third, fourth = [r for r in both if r[0] == 3], [r for r in both if r[0] == 4]
    assert len(third) > 400 and {r[0] for r in both} == {3, 4}
    assert [r[1] for r in third] != [r[1] for r in fourth]  # each epoch its own shard order and augmentation


@pytest.mark.slow
def test_lora_fine_tunes_a_trained_model_into_a_plain_merged_model(demo_root):
    """train.init_from the trained tiny model of the first test, with LoRA adapters of rank 4:
    prepare takes the model's vocabulary, the workers train the adapters only, and the saved
    folder is a plain model: the image tower (no LoRA target) is the starting model's bit for
    bit, the fusion layers (targets) moved, and the loss starts where a trained model is, far
    below a random start."""
    base, client = run(demo_root, "train.max_steps=20", "train.checkpoint_every=10", only=["train"])
    trained = client.get_run(base.by_name()["train"].run_id)
    producer = trained.data.tags.get("crossmodal.reused_from", trained.info.run_id)
    random_start = history(client, producer, "loss.total")[0]
    folder = Storage(base.by_name()["train"].output_uri).child("model").local_path()

    extra = ("train.max_steps=4", "train.checkpoint_every=4", "train.val_every=100")
    tuned, client = run(demo_root, *extra, f"train.init_from={folder}", "train.lora.rank=4", only=["prepare", "train"])
    run_id = tuned.by_name()["train"].run_id
    metrics = client.get_run(run_id).data.metrics
    assert 0 < metrics["train/trainable_params"] < metrics["train/total_params"] / 10
    first = history(client, run_id, "loss.total")[0]
    assert random_start[0] == first[0] == 1 and first[1] < 0.8 * random_start[1], (random_start, first)
    prepared = client.get_run(tuned.by_name()["prepare"].run_id).data.metrics
    assert prepared["answers.out_of_vocabulary"] == 0  # the same data: every answer is the model's

    start = load(folder).model.state_dict()
    saved = load(Storage(tuned.by_name()["train"].output_uri).child("model").local_path())
    merged = saved.model.state_dict()
    assert merged.keys() == start.keys()  # no adapter left: a plain model folder
    towers = [name for name in start if name.startswith("encoders.")]
    assert towers and all(torch.equal(merged[name], start[name]) for name in towers)
    targets = [name for name in start if name.startswith("fusion.") and name.endswith((".qkv.weight", ".q.weight"))]
    assert targets and all(not torch.equal(merged[name], start[name]) for name in targets)
