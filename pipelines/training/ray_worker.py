"""The per-worker function Ray Train runs: data from get_dataset_shard, checkpoints through
ray.train.report (every rank's ZeRO shard lands in the same checkpoint), metrics to the stage's
MLflow run by run id from rank 0 only."""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from model.config import DistillWeights, ModelConfig
from model.distill import DistillationObjective
from model.io import load
from model.lora import adapted, add_lora, parameter_summary
from model.multimodal import CrossModalModel
from model.objectives import MultiTaskObjective
from pipelines import env
from pipelines.config.train import LoopConfig
from pipelines.data.collate import to_model_batch
from pipelines.storage import Storage
from pipelines.training.engine import import_deepspeed
from pipelines.training.loop import Data, Sink, control_group, in_lockstep, train
from pipelines.training.tracking import MlflowSink

VAL_ROWS_KEPT = 4096  # per rank; about 0.4 GB at 224 px and 10 s of audio


def train_loop_per_worker(config: dict) -> None:
    env.configure()
    cfg = LoopConfig(**config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    import_deepspeed().init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")  # reuses Ray's group
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = CrossModalModel(ModelConfig.from_dict(config["model"]))
    if config.get("init"):  # fine-tuning (train.init_from, a pruned model's recovery): start from its weights
        model.load_state_dict(load(Storage(config["init"]).local_copy()).model.state_dict())
    if config.get("lora"):  # adapters in place, every other weight frozen: DeepSpeed trains the adapters only
        model = adapted(add_lora(model, **config["lora"]))
    objective = distillation(config, model) if config.get("teacher") else None
    clock = config["clock"]
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if config["validate"] else None  # no val split: no validation
    # Batches come to the host (pinned when a GPU takes them) and to_model_batch moves them: text
    # is trimmed on the host, so reading its length never waits for the GPU's previous step.
    device = ray.train.torch.get_device()
    host = {"device": "cpu", "pin_memory": device.type == "cuda"}

    lockstep = control_group()  # created on every rank at the same point, as collectives must be

    def train_epoch(first_epoch: int):
        if rank == 0:
            ray.get(clock.set.remote(first_epoch))  # where the pass starts: its epochs' file order, augmentation
        dist.barrier()
        batches = train_shard.iter_torch_batches(
            batch_size=cfg.micro_batch,
            drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed * 1000 + first_epoch,
            **host,
        )
        yield from in_lockstep((to_model_batch(batch, device) for batch in batches), lockstep)

    kept: list[dict] = []  # this rank's validation batches, read once: every pass is the same data

    def val_batches():
        if kept:
            yield from (to_model_batch(batch, device) for batch in kept)
            return
        batches = []
        for batch in val_shard.iter_torch_batches(batch_size=64, **host):
            batches.append(batch)
            yield to_model_batch(batch, device)
        # Each pass over the stream restarts its Ray Data execution (10-20 s of set-up on 2 cores);
        # a small split stays in memory instead (no augmentation: the rows are the same each time).
        if sum(len(b["weight"]) for b in batches) <= VAL_ROWS_KEPT:
            kept.extend(batches)

    tracker = MlflowSink(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    if tracker:
        counts = parameter_summary(model)
        tracker.log({"train/trainable_params": counts["trainable"], "train/total_params": counts["total"]}, 0)
    sink = Sink(
        log=tracker.log if tracker else lambda metrics, step: None,
        save=functools.partial(report, run=Storage(config["checkpoints"]) if config.get("checkpoints") else None),
        latest=restore_latest,
        log_config=tracker.log_config if tracker else lambda ds_config: None,
    )
    data = Data(train_epoch, val_batches if val_shard is not None else None)
    progress = train(model, cfg, data, sink, rank, world, objective)
    if tracker:
        tracker.log({"train_seconds": progress.train_seconds, "samples_seen": progress.samples}, progress.step)
        if objective is not None and progress.train_seconds:  # this session's share (a resumed run: since resuming)
            share = objective.teacher_seconds / progress.train_seconds
            tracker.log({"teacher_share": share}, progress.step)
            print(f"distill: the teacher's forward pass took {share:.0%} of the training time", flush=True)
        tracker.close()  # what waited in the buffer (MLflow was down) goes out before the stage ends


def distillation(config: dict, student: CrossModalModel) -> DistillationObjective:
    """The student's task losses plus the teacher's, the teacher on this worker's device."""
    teacher = load(Storage(config["teacher"]).local_copy()).model
    teacher = teacher.to(ray.train.torch.get_device())
    cfg = LoopConfig(**config["train"])
    return DistillationObjective(
        teacher, MultiTaskObjective(cfg.losses.weights()), DistillWeights(**config["distill"]), student.cfg.embed_dim
    )


def report(folder: Path, metrics: dict, run: Storage | None = None) -> None:
    """Persist this rank's part of a checkpoint into the run's folder `checkpoint_step<N>`. A
    write that fails (a full disk) removes that folder at once and raises: Ray never registers
    a checkpoint a rank failed to write, and what was written of it would hold the space Ray
    needs to record the previous checkpoint (its snapshot), so the run could not resume there."""
    name = f"checkpoint_step{int(metrics['step']):07d}"
    checkpoint = ray.train.Checkpoint.from_directory(str(folder))
    try:
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    except OSError as err:
        if run is None:
            raise
        with contextlib.suppress(OSError):  # another rank may be removing it too
            run.remove_tree(name)
        where = f"writing the step-{metrics['step']} checkpoint to {run.path(name)}, removed again"
        raise OSError(err.errno, f"{err.strerror or err} ({where})") from err


def restore_latest() -> Path | None:
    """The checkpoint Ray restores after a worker failure, or on a re-run of the same run name."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    target = Path(tempfile.mkdtemp(prefix="resume-"))
    shutil.rmtree(target)
    return Path(checkpoint.to_directory(str(target)))
