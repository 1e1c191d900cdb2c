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
from pydantic import ValidationError

from model.io import SavedModel, save
from model.multimodal import CrossModalModel
from model.tokenizer import Tokenizer
from pipelines import env
from pipelines.config import ConfigError, load_section
from pipelines.config.train import model_config_for
from pipelines.data.collate import to_model_batch
from pipelines.data.spec import DatasetSpec
from pipelines.data.transforms import augment_batch, balance_batch, decode_batch, keep_usable, tensor_batch
from pipelines.data.wds_reader import as_row, read_tar
from pipelines.storage import Storage
from pipelines.training.engine import consolidate, import_deepspeed
from pipelines.training.loop import Data, Sink, control_group, in_lockstep, train


class ShardStream(torch.utils.data.IterableDataset):
    """Numeric batches of one split for one rank: its shards, decoded, augmented, balanced; on
    train, `epochs` data epochs from `epoch` on in one pass (`train.stream_epochs`, as the Ray
    stream: no DataLoader restart per epoch), each batch tagged with its epoch."""

    def __init__(
        self,
        spec: DatasetSpec,
        split: str,
        rank: int,
        world: int,
        epoch: int,
        batch_size: int,
        train: bool,
        epochs: int = 1,
    ):
        super().__init__()
        self.spec, self.split, self.rank, self.world = spec, split, rank, world
        self.epoch, self.batch_size, self.train, self.epochs = epoch, batch_size, train, epochs

    def shards(self, epoch: int) -> list[str]:
        shards = list(self.spec.shards[self.split])
        if self.train:  # a different order each epoch, the same on every rank
            random.Random(self.spec.seed * 1000 + epoch).shuffle(shards)
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return shards[self.rank * workers + worker :: self.world * workers]

    def __iter__(self):
        for epoch in range(self.epoch, self.epoch + self.epochs):
            for batch in self.epoch_batches(epoch):
                if self.train:
                    batch["epoch"] = np.full(len(batch["weight"]), epoch, np.int32)
                yield batch

    def epoch_batches(self, epoch: int):

        rows = []
        for uri in self.shards(epoch):
            shard = Storage(uri)
            with shard.fs.open_input_stream(shard.path()) as stream:
                for item in read_tar(stream, uri, self.spec.member_limit):
                    rows.append(as_row(item, uri, self.split))
                    if len(rows) == self.batch_size:
                        yield from self._process(rows, epoch)
                        rows = []
        if rows:
            yield from self._process(rows, epoch)

    def _process(self, rows, epoch: int):

        batch = {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}
        batch = keep_usable(decode_batch(batch, self.spec.settings))
        if self.train:
            batch = augment_batch(batch, self.spec.augment, self.spec.seed, epoch, self.spec.settings.sample_rate)
            batch = balance_batch(batch, self.spec.multiplicity, self.spec.weights, self.spec.seed, epoch)
        if len(batch["key"]):
            yield tensor_batch(batch, self.spec.tokenizer_json, tuple(self.spec.answers), self.spec.max_text_len)


def rebatch(chunks, size: int, drop_last: bool):
    """Processed chunks of any length -> batches of exactly `size` rows, each in storage of its
    own (a view into a bigger tensor would carry all of it through the DataLoader's queue)."""
    pending: list[dict[str, torch.Tensor]] = []
    count = 0
    for chunk in chunks:
        pending.append({name: torch.as_tensor(values) for name, values in chunk.items()})
        count += len(pending[-1]["weight"])
        while count >= size:
            taken, need = [], size
            while need:
                rows = len(pending[0]["weight"])
                if rows <= need:
                    taken.append(pending.pop(0))
                    need -= rows
                else:
                    taken.append({k: v[:need] for k, v in pending[0].items()})
                    pending[0] = {k: v[need:] for k, v in pending[0].items()}
                    need = 0
            yield {k: torch.cat([part[k] for part in taken]) for k in taken[0]}
            count -= size
    if count and not drop_last:
        yield {k: torch.cat([part[k] for part in pending]) for k in pending[0]}


class MicroBatches(torch.utils.data.IterableDataset):
    """A ShardStream cut into micro-batches inside each DataLoader worker: the training process
    only receives finished batches (it joined 32-row chunks itself before, serially with the step)."""

    def __init__(self, stream: ShardStream, size: int):
        super().__init__()
        self.stream, self.size = stream, size

    def __iter__(self):
        return rebatch(iter(self.stream), self.size, drop_last=self.stream.train)


def model_batches(spec, split, rank, world, epoch, size, train, epochs, workers, device):
    """This rank's model batches of `size` rows on `device`: `workers` DataLoader processes read,
    decode, augment and cut them (the training loop's data path; the GPU benchmark times it alone)."""
    stream = ShardStream(spec, split, rank, world, epoch, spec.batch_size, train, epochs)
    # Pinned host memory (filled by the DataLoader's own thread) makes the copy to the GPU
    # asynchronous: the next batch moves while this step runs.
    loaded = torch.utils.data.DataLoader(
        MicroBatches(stream, size), batch_size=None, num_workers=workers, pin_memory=device.type == "cuda"
    )
    return (to_model_batch(b, device) for b in loaded)


def main(argv: list[str] | None = None) -> int:
    env.configure()
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.training.standalone", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--spec", required=True, help="dataset_spec.json written by the prepare stage")
    parser.add_argument("--config", required=True, help="pipeline YAML (its train section is used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", required=True, help="folder for checkpoints and the consolidated model")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes per rank")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (optional)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher
    args = parser.parse_args(argv)

    try:  # the train section alone: the prepared data (the spec) fixes the rest
        cfg = load_section(args.config, args.overrides, "train")
        spec = read_spec(Path(args.spec))
    except ConfigError as err:
        parser.exit(2, f"{parser.prog}: {err}\n")
    if cfg.init_from or cfg.lora.rank is not None:  # not silently ignored: a run from random weights is another run
        parser.exit(2, f"{parser.prog}: train.init_from and train.lora run in the pipeline's train stage, not here\n")
    log = tracker_for(args.tracking_uri) if int(os.environ.get("RANK", 0)) == 0 else None
    run(cfg, spec, Path(args.out), args.workers, log)
    return 0


def read_spec(path: Path) -> DatasetSpec:
    """The prepare stage's dataset_spec.json; a missing or broken file is a one-line ConfigError."""

    try:
        return DatasetSpec(**json.loads(path.read_text(encoding="utf-8")))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the dataset spec ({err.strerror or err})") from None
    except (ValueError, TypeError) as err:  # bad JSON, or fields that are not a prepare stage's spec
        first = err.errors()[0] if isinstance(err, ValidationError) else None
        detail = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else str(err).splitlines()[0]
        raise ConfigError(f"{path}: not a dataset spec written by the prepare stage ({detail})") from None


def run(cfg, spec: DatasetSpec, out: Path, loader_workers: int, log=None):
    """Train, consolidate and save; returns the loop's progress. `log(metrics, step)` gets rank 0's
    metrics (None: printed)."""

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
    control = control_group()

    def loader(split, epoch, train_split):
        epochs = cfg.stream_epochs if train_split else 1
        size = cfg.micro_batch if train_split else 64
        batches = model_batches(spec, split, rank, world, epoch, size, train_split, epochs, loader_workers, device)
        return in_lockstep(batches, control)

    def save_checkpoint(folder: Path, metrics: dict) -> None:
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.copytree(folder, checkpoints, dirs_exist_ok=True)  # every rank adds its own files
        dist.barrier()

    def latest():
        return checkpoints if (checkpoints / "latest").exists() else None

    sink = Sink(
        log=(log or print_metrics) if rank == 0 else (lambda metrics, step: None), save=save_checkpoint, latest=latest
    )
    data = Data(
        lambda epoch: loader("train", epoch, True), lambda: loader("val", 0, False) if "val" in spec.shards else None
    )
    progress = train(model, cfg, data, sink, rank, world)
    dist.barrier()
    if rank == 0:
        # A fresh model: the trained one's fp32 parameters are views into DeepSpeed's flat buffers,
        # which safetensors refuses to save (it would write the whole buffer for each).
        trained = CrossModalModel(model_cfg)
        trained.load_state_dict(consolidate(checkpoints, cfg.zero_stage))
        save(SavedModel(trained.eval(), tokenizer, spec.answers, {"steps": progress.step}), out / "model")
        print(
            f"standalone: {progress.step} steps, {progress.samples} samples in {progress.train_seconds:.1f} s; "
            f"model in {out / 'model'}",
            flush=True,
        )
    dist.barrier()
    return progress


def print_metrics(metrics: dict, step: int) -> None:
    print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())), flush=True)


def tracker_for(uri: str | None):
    """A log(metrics, step) function for an MLflow run, or None when MLflow is not wanted/installed."""
    if not uri:
        return None
    try:
        from pipelines.training.tracking import standalone_run
    except ImportError:
        print("standalone: MLflow is not installed here; metrics are printed only", flush=True)
        return None
    return standalone_run(uri).log


if __name__ == "__main__":
    raise SystemExit(main())
