"""Train: DeepSpeed ZeRO workers on Ray Train over the prepared stream, fault tolerant,
one MLflow run (rank 0 logs into this stage's run by id).

Checkpoints live under <storage root>/ray_train/train-<identity>: a worker that dies is
replaced and training continues from the latest checkpoint (FailureConfig), and a re-run of
the pipeline after the driver died resumes there too (Ray Train resumes a run name it finds);
`--force` / `--from` start over instead.
At the end the ZeRO shards are consolidated into one fp32 state dict and saved in the model
library's format (safetensors + config + tokenizer). The test split is the evaluate stage's:
one scoring path for every model (validation during training uses the same code).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from model.io import SavedModel, save
from model.multimodal import CrossModalModel, parameter_counts
from model.tokenizer import Tokenizer
from pipelines.config.train import TrainConfig, model_config_for
from pipelines.dag import StageContext, StageError, StageResult
from pipelines.data.dataset import DatasetSpec, EpochClock, build_dataset, limit_data_cpus
from pipelines.data.profile import train_findings
from pipelines.storage import Storage
from pipelines.training.engine import consolidate
from pipelines.training.ray_worker import train_loop_per_worker


def train(cfg: TrainConfig, ctx: StageContext) -> StageResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = DatasetSpec(**Storage(ctx.inputs["prepare"].outputs["spec"]).read_json())
    findings = train_findings(cfg.losses, spec.profile) if spec.profile else []
    for finding in findings:  # before minutes of training: tasks the data cannot train
        print(f"train: warning: {finding}")
    if "val" not in spec.shards:
        print("train: no val split in the prepared data: no validation")
    per_worker = sum(spec.profile.get("combinations", {}).values()) // cfg.workers
    if spec.profile and per_worker < cfg.micro_batch:
        raise StageError(
            f"train.micro_batch: {cfg.micro_batch} per worker, but the train split has {per_worker} "
            f"samples for each of {cfg.workers} workers: set it to {max(1, per_worker // 2)} or less"
        )
    tokenizer = Tokenizer.from_json(spec.tokenizer_json)
    model_cfg = model_config_for(cfg, spec, tokenizer)
    print(
        f"train: model {cfg.model.size} ({parameter_counts(CrossModalModel(model_cfg))['total']:,} parameters), "
        f"{cfg.workers} workers, ZeRO-{cfg.zero_stage} {cfg.precision}"
    )
    limit_data_cpus(spec.data_cpus, progress_bars=False)
    clock = EpochClock.remote(0)
    try:
        train_data = build_dataset(spec, "train", epoch=clock, epochs=cfg.stream_epochs)
    except ValueError as err:  # settings that do not fit together, e.g. stream_epochs with a materialised split
        raise StageError(f"train: {err}") from None
    checkpoints = ctx.storage.child("ray_train")
    run_name = f"train-{ctx.identity[:16]}"
    if ctx.forced and checkpoints.exists(run_name):  # a forced re-run trains from scratch
        print(f"train: --force: removing the checkpoints of the earlier run ({checkpoints.path(run_name)})")
        checkpoints.remove_tree(run_name)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "model": model_cfg.to_dict(),
            "clock": clock,
            "tracking_uri": ctx.tracking_uri,
            "run_id": ctx.run_id,
            "validate": "val" in spec.shards,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        datasets={"train": train_data} | ({"val": build_dataset(spec, "val")} if "val" in spec.shards else {}),
        run_config=RunConfig(
            name=run_name,
            storage_path=checkpoints.uri,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise TrainingFailed(root_cause(result.error)) from result.error
    if result.checkpoint is None:
        raise StageError("train: training ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = consolidate(folder, cfg.zero_stage)
    model = CrossModalModel(model_cfg)
    model.load_state_dict(state)
    model.eval()
    model_uri = save_model(
        SavedModel(model, tokenizer, spec.answers, {"run_id": ctx.run_id, "checkpoint": result.checkpoint.path}),
        ctx.output.child("model"),
    )
    steps = (result.metrics or {}).get("step", 0)
    print(f"train: {steps} steps; model saved to {model_uri}")
    files = ("model.safetensors", "config.json", "tokenizer.json")
    return StageResult(
        outputs={"model": model_uri, "checkpoint": result.checkpoint.path},
        metrics={"steps": steps, "warnings": len(findings)},
        summary={"steps": steps, "warnings": [str(f) for f in findings]},
        tables={"warnings": [f.as_row() for f in findings]},
        artifacts={f"model/{name}": f"{model_uri}/{name}" for name in files},
    )


class TrainingFailed(RuntimeError):
    """Training failed on a worker or the controller; the message names the root cause."""


def root_cause(error: BaseException) -> str:
    """'worker 1: ValueError: ...' from Ray Train's wrapper exceptions."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        rank, cause = sorted(failures.items())[0]
        lines = str(cause).strip().splitlines()
        return f"worker {rank}: {type(cause).__name__}: {lines[-1] if lines else ''}"
    cause = getattr(error, "controller_failure", error)
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def save_model(saved: SavedModel, target: Storage) -> str:
    """Write the model folder locally, then copy it to the storage root (any filesystem)."""
    with tempfile.TemporaryDirectory() as folder:
        save(saved, folder)
        for path in Path(folder).iterdir():
            target.write_bytes(path.read_bytes(), path.name)
    return target.uri
