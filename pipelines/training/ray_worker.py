"""The per-worker function Ray Train runs: data from get_dataset_shard, checkpoints through
ray.train.report (every rank's ZeRO shard lands in the same checkpoint), metrics to the stage's
MLflow run by run id from rank 0 only."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch


def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from model.config import ModelConfig
    from model.multimodal import CrossModalModel
    from pipelines import env
    from pipelines.data.collate import to_model_batch
    from pipelines.training.config import TrainConfig
    from pipelines.training.engine import import_deepspeed
    from pipelines.training.loop import Data, Sink, train

    env.configure()
    cfg = TrainConfig(**config["train"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    import_deepspeed().init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")  # reuses Ray's group
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = CrossModalModel(ModelConfig.from_dict(config["model"]))
    clock = config["clock"]
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    # Batches come to the host (pinned when a GPU takes them) and to_model_batch moves them: text
    # is trimmed on the host, so reading its length never waits for the GPU's previous step.
    device = ray.train.torch.get_device()
    host = {"device": "cpu", "pin_memory": device.type == "cuda"}

    def train_epoch(first_epoch: int):
        if rank == 0:
            ray.get(clock.set.remote(first_epoch))  # where the pass starts: its epochs' file order, augmentation
        dist.barrier()
        for batch in train_shard.iter_torch_batches(
            batch_size=cfg.micro_batch,
            drop_last=True,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed * 1000 + first_epoch,
            **host,
        ):
            yield to_model_batch(batch, device)

    def val_batches():
        for batch in val_shard.iter_torch_batches(batch_size=64, **host):
            yield to_model_batch(batch, device)

    tracker = MlflowSink(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    sink = Sink(
        log=tracker.log if tracker else lambda metrics, step: None,
        save=report,
        latest=restore_latest,
        log_config=tracker.log_config if tracker else lambda ds_config: None,
    )
    progress = train(model, cfg, Data(train_epoch, val_batches), sink, rank, world)
    if tracker:
        tracker.log({"train_seconds": progress.train_seconds, "samples_seen": progress.samples}, progress.step)


def report(folder: Path, metrics: dict) -> None:
    import ray.train

    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))


def restore_latest() -> Path | None:
    """The checkpoint Ray restores after a worker failure, or on a re-run of the same run name."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    target = Path(tempfile.mkdtemp(prefix="resume-"))
    shutil.rmtree(target)
    return Path(checkpoint.to_directory(str(target)))


class MlflowSink:
    """Rank 0's view of the stage's MLflow run: metrics by run id, batched per call."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        from pipelines.lineage import metric_name

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(metric_name(k), float(v), now, step) for k, v in metrics.items() if v == v]
        )

    def log_config(self, ds_config: dict) -> None:
        self.client.log_dict(self.run_id, ds_config, "deepspeed_config.json")
