"""One training run on Ray Train: DeepSpeed workers over the prepared stream, checkpoints
under the storage root, the stage's MLflow run as the place metrics go. The train, distill and
prune stages all train through here (and so through the same loop), each with its own model,
starting weights and objective.

Checkpoints live under <storage root>/ray_train/<stage>-<identity>: a worker that dies is
replaced and training continues from the latest checkpoint (FailureConfig), and a re-run of
the pipeline after the driver died resumes there too (Ray Train resumes a run name it finds);
`--force` / `--from` start over instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs
import torch

from model.config import ModelConfig
from pipelines.config.train import LoopConfig
from pipelines.dag import StageContext, StageError
from pipelines.data.dataset import DatasetSpec, build_dataset, limit_data_cpus, local_clock
from pipelines.storage import Storage
from pipelines.training.engine import consolidate
from pipelines.training.ray_worker import train_loop_per_worker

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the checkpoints it registered


@dataclass
class Fitted:
    state: dict[str, torch.Tensor]  # the model's consolidated fp32 weights
    steps: int
    checkpoint: str  # where the last checkpoint is (URI)
    metrics: dict[str, float]  # the last metrics the workers reported


class TrainingFailed(RuntimeError):
    """Training failed on a worker or the controller; the message names the root cause."""


def fit(
    cfg: LoopConfig,
    model_cfg: ModelConfig,
    spec: DatasetSpec,
    ctx: StageContext,
    *,
    init: str | None = None,
    teacher: str | None = None,
    distill: dict | None = None,
    lora: dict | None = None,
) -> Fitted:
    """Train `model_cfg` (from random weights, or from the model folder `init`) on the prepared
    train split; with `teacher` (a model folder) and `distill` (DistillWeights as a dict) the
    loss adds the teacher's; with `lora` (add_lora's arguments) only adapters train, and the
    state returned is that of the model with its adapters in place (`model.lora.adapted`)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    limit_data_cpus(spec.data_cpus, progress_bars=False)
    clock = local_clock(0)  # on this stage's node: not a second thing a node's loss can break
    try:
        train_data = build_dataset(spec, "train", epoch=clock, epochs=cfg.stream_epochs)
    except ValueError as err:  # settings that do not fit together, e.g. stream_epochs with a materialised split
        raise StageError(f"{ctx.stage}: {err}") from None
    checkpoints = ctx.storage.child("ray_train")
    run_name = f"{ctx.stage}-{ctx.identity[:16]}"
    if ctx.forced and checkpoints.exists(run_name):  # a forced re-run trains from scratch
        print(f"{ctx.stage}: --force: removing the checkpoints of the earlier run ({checkpoints.path(run_name)})")
        checkpoints.remove_tree(run_name)
    removed = remove_unregistered(checkpoints.child(run_name))
    if removed:
        print(f"{ctx.stage}: removed {len(removed)} half-written checkpoint folders of an earlier attempt: {removed}")
    validate = "val" in spec.shards
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.loop().model_dump(mode="json"),
            "model": model_cfg.to_dict(),
            "init": init,
            "teacher": teacher,
            "distill": distill,
            "lora": lora,
            "clock": clock,
            "tracking_uri": ctx.tracking_uri,
            "run_id": ctx.run_id,
            "checkpoints": checkpoints.child(run_name).uri,  # where a failed checkpoint write is cleaned up
            "validate": validate,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
            placement_strategy=cfg.placement,
        ),
        datasets={"train": train_data} | ({"val": build_dataset(spec, "val")} if validate else {}),
        dataset_config=DataConfig(execution_options={"train": ingest_options(cfg.deterministic)}),
        run_config=RunConfig(
            name=run_name,
            storage_path=checkpoints.uri,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    try:  # Ray Train 2.x raises where it used to return a Result with `error`
        result = trainer.fit()
    except TrainingFailedError as err:
        raise TrainingFailed(failure_message(err, checkpoints.path(run_name))) from err
    if result.error is not None:
        raise TrainingFailed(failure_message(result.error, checkpoints.path(run_name))) from result.error
    if result.checkpoint is None:
        raise StageError(f"{ctx.stage}: training ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = consolidate(folder, cfg.zero_stage)
    metrics = dict(result.metrics or {})
    return Fitted(state, int(metrics.get("step", 0)), result.checkpoint.path, metrics)


def remove_unregistered(run: Storage) -> list[str]:
    """Remove the checkpoint folders of a Ray Train run that Ray never registered, and return
    their names. A worker that died, or a disk that filled, while writing a checkpoint leaves
    one behind: Ray never resumes from it (it resumes the newest checkpoint its snapshot lists,
    and lists one only when every worker has written its part), but it takes space, the most
    where space ran out. A snapshot that cannot be read: nothing is touched (Ray reports it)."""
    if not run.exists():
        return []
    registered: set[str] = set()
    if run.exists(SNAPSHOT):
        try:
            snapshot = run.read_json(SNAPSHOT)
            results = [*snapshot["checkpoint_results"], *snapshot["pending_training_results"]]
            registered = {result["checkpoint_dir_name"] for result in results}
        except (ValueError, KeyError, TypeError):
            return []
    listed = run.fs.get_file_info(pafs.FileSelector(run.path()))
    names = {i.base_name for i in listed if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")}
    orphans = sorted(names - registered)
    for name in orphans:
        run.remove_tree(name)
    return orphans


def ingest_options(deterministic: bool):
    """Ray Data's options for the train stream: Ray Train's defaults (this process's resource
    limits), with the blocks kept in order when `deterministic`. Without it, blocks reach the
    split in the order their tasks finish, so which rows each worker gets, and the weights at
    the end, change from run to run (measured: relative L2 0.004 between two runs of 16 steps
    with the same seed, see tests/drill/faults_training.py)."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = deterministic
    return options


def failure_message(error: BaseException, checkpoints: str) -> str:
    """The root cause, and on a full disk where the checkpoints are and what became of them."""
    message = root_cause(error)
    if "No space left on device" in message:
        where = "" if checkpoints in message else f" in {checkpoints}"
        message += f"; the newest complete checkpoint{where} is kept, and a re-run with space resumes from it"
    return message


def root_cause(error: BaseException) -> str:
    """'worker 1: ValueError: ...' from Ray Train's wrapper exceptions."""
    failures = getattr(error, "worker_failures", None)
    if failures:
        rank, cause = sorted(failures.items())[0]
        # Ray wraps a worker's exception in one whose text is the traceback: name the original.
        cause = getattr(cause, "_base_exc", cause)
        lines = str(cause).strip().splitlines()
        return f"worker {rank}: {type(cause).__name__}: {lines[-1] if lines else ''}"
    cause = getattr(error, "controller_failure", error)
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"
