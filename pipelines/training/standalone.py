"""The same training loop without Ray: torchrun / the deepspeed launcher over the prepared shards.

    torchrun --nproc_per_node 2 -m pipelines.training.standalone \\
        --spec runs/storage/stages/prepare/<id>/dataset_spec.json \\
        --config pipelines/configs/demo.yaml [--set train.max_steps=100] --out runs/standalone

This is how training runs on a GPU machine that has no Ray (and maybe no MLflow): each rank
reads its own share of the shards with the project's safe reader and the same decode,
augmentation, balancing and tensor code as the Ray Data stream, in DataLoader workers.
Checkpoints go to OUT/checkpoints (resumed from when present), the consolidated model to
OUT/model; metrics are printed by rank 0 and, when --tracking-uri is given and MLflow is
installed, logged to a run there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipelines import env
from pipelines.data.spec import DatasetSpec


class ShardStream(torch.utils.data.IterableDataset):
    """Numeric batches of one split for one rank: its shards, decoded, augmented, balanced."""

    def __init__(self, spec: DatasetSpec, split: str, rank: int, world: int, epoch: int, batch_size: int, train: bool):
        super().__init__()
        self.spec, self.split, self.rank, self.world = spec, split, rank, world
        self.epoch, self.batch_size, self.train = epoch, batch_size, train

    def shards(self) -> list[str]:
        shards = list(self.spec.shards[self.split])
        if self.train:  # a different order each epoch, the same on every rank
            random.Random(self.spec.seed * 1000 + self.epoch).shuffle(shards)
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return shards[self.rank * workers + worker::self.world * workers]

    def __iter__(self):
        from pipelines.data.datasource import as_row
        from pipelines.data.transforms import augment_batch, balance_batch, decode_batch, keep_usable, tensor_batch
        from pipelines.data.wds_reader import read_tar
        from pipelines.storage import Storage

        rows = []
        for uri in self.shards():
            shard = Storage(uri)
            with shard.fs.open_input_stream(shard.path()) as stream:
                for item in read_tar(stream, uri, self.spec.member_limit):
                    rows.append(as_row(item, uri, self.split))
                    if len(rows) == self.batch_size:
                        yield from self._process(rows, decode_batch, keep_usable, augment_batch, balance_batch, tensor_batch)
                        rows = []
        if rows:
            yield from self._process(rows, decode_batch, keep_usable, augment_batch, balance_batch, tensor_batch)

    def _process(self, rows, decode_batch, keep_usable, augment_batch, balance_batch, tensor_batch):
        batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
        batch = keep_usable(decode_batch(batch, self.spec.settings))
        if self.train:
            batch = augment_batch(batch, self.spec.augment, self.spec.seed, self.epoch, self.spec.settings.sample_rate)
            batch = balance_batch(batch, self.spec.multiplicity, self.spec.weights, self.spec.seed, self.epoch)
        if len(batch["key"]):
            yield tensor_batch(batch, self.spec.tokenizer_json, tuple(self.spec.answers), self.spec.max_text_len)


def rebatch(chunks, size: int, drop_last: bool):
    """Processed chunks of any length -> batches of exactly `size` rows."""
    pending: dict[str, list] = {}
    count = 0
    for chunk in chunks:
        for name, values in chunk.items():
            pending.setdefault(name, []).append(torch.as_tensor(values))
        count += len(chunk["weight"])
        while count >= size:
            joined = {k: torch.cat(v) for k, v in pending.items()}
            yield {k: v[:size] for k, v in joined.items()}
            pending = {k: [v[size:]] for k, v in joined.items()}
            count -= size
    if count and not drop_last:
        yield {k: torch.cat(v) for k, v in pending.items()}


def in_lockstep(batches):
    """Stop every rank as soon as one runs out: DeepSpeed's collectives need equal step counts."""
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        flag = torch.tensor([0.0 if batch is None else 1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 0:
            return
        yield batch


def main(argv: list[str] | None = None) -> int:
    env.configure()
    parser = argparse.ArgumentParser(prog="python -m pipelines.training.standalone", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="dataset_spec.json written by the prepare stage")
    parser.add_argument("--config", required=True, help="pipeline YAML (its train section is used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", required=True, help="folder for checkpoints and the consolidated model")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes per rank")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (optional)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher
    args = parser.parse_args(argv)

    from pipelines.config import load_config  # noqa: PLC0415 - after env.configure()

    cfg = load_config(args.config, args.overrides).train
    spec = DatasetSpec(**json.loads(Path(args.spec).read_text()))
    out = Path(args.out)
    return run(cfg, spec, out, args.workers, args.tracking_uri)


def run(cfg, spec: DatasetSpec, out: Path, loader_workers: int, tracking_uri: str | None) -> int:
    from model.io import SavedModel, save
    from model.multimodal import CrossModalModel
    from model.tokenizer import Tokenizer
    from pipelines.data.collate import to_model_batch
    from pipelines.training.config import model_config_for
    from pipelines.training.engine import consolidate, import_deepspeed
    from pipelines.training.loop import Data, Sink, train

    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    tokenizer = Tokenizer.from_json(spec.tokenizer_json)
    model_cfg = model_config_for(cfg, spec, tokenizer)
    torch.manual_seed(cfg.seed)
    model = CrossModalModel(model_cfg)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    checkpoints = out / "checkpoints"

    def loader(split, epoch, train_split):
        stream = ShardStream(spec, split, rank, world, epoch, spec.batch_size, train_split)
        chunks = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=loader_workers)
        size = cfg.micro_batch if train_split else 64
        return in_lockstep(to_model_batch(b, device) for b in rebatch(chunks, size, drop_last=train_split))

    def save_checkpoint(folder: Path, metrics: dict) -> None:
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder, checkpoints, dirs_exist_ok=True)  # every rank adds its own files
        dist.barrier()

    def latest():
        return checkpoints if (checkpoints / "latest").exists() else None

    tracker = tracker_for(tracking_uri) if rank == 0 else None
    sink = Sink(log=tracker or (lambda metrics, step: print(f"step {step}: " + ", ".join(
        f"{k} {v:.4g}" for k, v in sorted(metrics.items())), flush=True)) if rank == 0 else (lambda m, s: None),
        save=save_checkpoint, latest=latest)
    data = Data(lambda epoch: loader("train", epoch, True), lambda: loader("val", 0, False) if "val" in spec.shards else None)
    progress = train(model, cfg, data, sink, rank, world)
    dist.barrier()
    if rank == 0:
        model.load_state_dict(consolidate(checkpoints, cfg.zero_stage))
        save(SavedModel(model.float().eval(), tokenizer, spec.answers, {"steps": progress.step}), out / "model")
        print(f"standalone: {progress.step} steps, {progress.samples} samples in {progress.train_seconds:.1f} s; "
              f"model in {out / 'model'}", flush=True)
    dist.barrier()
    return 0


def tracker_for(uri: str | None):
    """A log(metrics, step) function for an MLflow run, or None when MLflow is not wanted/installed."""
    if not uri:
        return None
    try:
        from mlflow import MlflowClient
    except ImportError:
        print("standalone: MLflow is not installed here; metrics are printed only", flush=True)
        return None
    from pipelines.training.ray_worker import MlflowSink

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("crossmodal-standalone") or client.get_experiment(
        client.create_experiment("crossmodal-standalone"))
    run_id = client.create_run(experiment.experiment_id, run_name="standalone-train").info.run_id
    return MlflowSink(uri, run_id).log


if __name__ == "__main__":
    raise SystemExit(main())
