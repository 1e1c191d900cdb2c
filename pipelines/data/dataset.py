"""The streaming dataset the prepare stage describes and a Ray Train worker consumes.

`DatasetSpec` (JSON in the prepare stage's output) holds everything needed to rebuild the
pipeline anywhere: shard lists, decode settings, tokenizer, answer vocabulary, augmentation,
the balancing plan, the seed. `build_dataset(spec, split, epoch)` returns a lazy Ray Dataset:

    shards (file-shuffled with a seed) -> safe reader -> decode -> drop quarantined
        -> augment (train) -> balance (train) -> numeric tensors

Nothing is materialised unless the stage was asked to (then decoding is read back from
Parquet instead of being redone). `epoch` is an int or an `EpochClock` actor: Ray Train
re-executes the dataset every epoch, and the clock tells the transforms which epoch it is, so
augmentation and resampling are fresh each epoch and reproducible from the seed.
"""

from __future__ import annotations

import posixpath

import ray

from pipelines.data.datasource import SafeShardDatasource
from pipelines.data.spec import DatasetSpec
from pipelines.data.transforms import augment_batch, balance_batch, decode_batch, keep_usable, tensor_batch
from pipelines.storage import Storage


@ray.remote(num_cpus=0)
class EpochClock:
    """The epoch number the data transforms should use; the trainer sets it before each epoch."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def get(self) -> int:
        return self.epoch

    def set(self, epoch: int) -> None:
        self.epoch = epoch


def read_decoded(spec: DatasetSpec, split: str, epoch_seed: int | None) -> ray.data.Dataset:
    """Decoded rows of a split (quarantined rows included, with their reason)."""
    shuffle = ray.data.FileShuffleConfig(seed=epoch_seed) if epoch_seed is not None else None
    if split in spec.materialized:
        store = Storage(spec.materialized[split])
        return ray.data.read_parquet(store.path(), filesystem=store.fs, shuffle=shuffle)
    uris = spec.shards[split]
    store = Storage(posixpath.dirname(uris[0]))
    paths = [Storage(u).path() for u in uris]
    source = SafeShardDatasource(paths, member_limit=spec.member_limit, filesystem=store.fs, shuffle=shuffle)
    # One block per shard: letting Ray split each shard's block into small ones to reach its
    # target parallelism made 5x more decode tasks and cost ~30% throughput on 2 cores.
    return ray.data.read_datasource(source, override_num_blocks=len(paths)).map_batches(
        decode_batch, fn_kwargs={"settings": spec.settings}, batch_size=spec.batch_size, batch_format="numpy")


def build_dataset(spec: DatasetSpec, split: str, epoch=0, augment: bool | None = None,
                  balance: bool | None = None) -> ray.data.Dataset:
    """The model-ready stream of one split. Train: augmented, balanced, files shuffled."""
    train = split == "train"
    augment = train if augment is None else augment
    balance = train if balance is None else balance
    epoch_seed = None
    if train:  # a different file order each epoch, reproducible from the seed
        epoch_seed = spec.seed * 1000 + (epoch if isinstance(epoch, int) else 0)
    ds = read_decoded(spec, split, epoch_seed).map_batches(keep_usable, batch_size=spec.batch_size, batch_format="numpy")
    if augment:
        ds = ds.map_batches(augment_batch, batch_size=spec.batch_size, batch_format="numpy",
                            fn_kwargs={"cfg": spec.augment, "seed": spec.seed, "epoch": epoch,
                                       "sample_rate": spec.settings.sample_rate})
    if balance:
        ds = ds.map_batches(balance_batch, batch_size=spec.batch_size, batch_format="numpy",
                            fn_kwargs={"multiplicity": spec.multiplicity, "weights": spec.weights,
                                       "seed": spec.seed, "epoch": epoch})
    return ds.map_batches(tensor_batch, batch_size=spec.batch_size, batch_format="numpy",
                          fn_kwargs={"tokenizer_json": spec.tokenizer_json, "answers": tuple(spec.answers),
                                     "max_text_len": spec.max_text_len})


def limit_data_cpus(cpus: float) -> None:
    """Cap the CPUs Ray Data takes in this process's executions, so train workers keep theirs;
    no spinning while the consumer is the bottleneck (see pipelines.data.executor).
    Per-operator progress bars off: from a stage task they reach the driver as log lines."""
    from pipelines.data.executor import install

    ctx = ray.data.DataContext.get_current()
    install(ctx)
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(cpu=cpus)
    ctx.enable_operator_progress_bars = False
