"""The streaming dataset the prepare stage describes and a Ray Train worker consumes.

`DatasetSpec` (JSON in the prepare stage's output) holds everything needed to rebuild the
pipeline anywhere: shard lists, decode settings, tokenizer, answer vocabulary, augmentation,
the balancing plan, the seed. `build_dataset(spec, split, epoch)` returns a lazy Ray Dataset:

    shards (file-shuffled with a seed) -> safe reader -> decode -> drop quarantined
        -> augment (train) -> balance (train) -> numeric tensors

Nothing is materialised unless the stage was asked to (then decoding is read back from
Parquet instead of being redone). The train split streams `epochs` epochs per execution
(`EpochStream`: no drain and refill of the pipeline between them) and every row carries its
epoch. `epoch` is the first epoch of an execution ("a pass"): an int or an `EpochClock` actor
that Ray Train's worker sets before each pass, so augmentation, resampling and file order are
fresh each epoch and reproducible from the seed: a pass from epoch e holds e ... e + epochs - 1.
"""

from __future__ import annotations

import posixpath

import ray

from pipelines.data.datasource import EpochStream, SafeShardDatasource
from pipelines.data.spec import DatasetSpec
from pipelines.data.transforms import augment_batch, balance_batch, decode_batch, keep_usable, tensor_batch, with_epoch
from pipelines.patches import install_idle_backoff
from pipelines.storage import Storage


@ray.remote(num_cpus=0)
class EpochClock:
    """The first epoch of the pass over the train stream; the trainer sets it before each pass."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def get(self) -> int:
        return self.epoch

    def set(self, epoch: int) -> None:
        self.epoch = epoch


def local_clock(epoch: int = 0):
    """An EpochClock on this process's node. On another node, that node's loss would kill the
    actor and fail every restart of Ray Train (each reads the dead clock: the two-node drill saw
    it); here, losing the node ends the stage that made the clock anyway."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return EpochClock.options(scheduling_strategy=here).remote(epoch)


def read_decoded(spec: DatasetSpec, split: str, epoch_seed: int | None) -> ray.data.Dataset:
    """Decoded rows of a split (quarantined rows included, with their reason)."""
    shuffle = ray.data.FileShuffleConfig(seed=epoch_seed) if epoch_seed is not None else None
    if split in spec.materialized:
        store = Storage(spec.materialized[split])
        return ray.data.read_parquet(store.path(), filesystem=store.fs, shuffle=shuffle)
    store, paths = shard_paths(spec, split)
    source = SafeShardDatasource(paths, member_limit=spec.member_limit, filesystem=store.fs, shuffle=shuffle)
    # One block per shard: letting Ray split each shard's block into small ones to reach its
    # target parallelism made 5x more decode tasks and cost ~30% throughput on 2 cores.
    return decode(spec, ray.data.read_datasource(source, override_num_blocks=len(paths)))


def read_epochs(spec: DatasetSpec, epochs: int, first_epoch) -> ray.data.Dataset:
    """Decoded train rows of `epochs` consecutive epochs, each row tagged with its epoch."""
    if "train" in spec.materialized:  # Parquet: one epoch per pass, the epoch added as a column
        if epochs != 1:
            raise ValueError(
                "train.stream_epochs must be 1 when prepare.materialize is true "
                f"(got {epochs}): a materialised split streams one epoch per pass"
            )
        seed = spec.seed * 1000 + (first_epoch if isinstance(first_epoch, int) else 0)
        return read_decoded(spec, "train", seed).map_batches(
            with_epoch, fn_kwargs={"epoch": first_epoch}, batch_size=spec.batch_size, batch_format="numpy"
        )
    store, paths = shard_paths(spec, "train")
    source = EpochStream(paths, store.fs, spec.member_limit, spec.seed, epochs, first_epoch)
    return decode(spec, ray.data.read_datasource(source, override_num_blocks=len(paths) * epochs))


def shard_paths(spec: DatasetSpec, split: str) -> tuple[Storage, list[str]]:
    uris = spec.shards[split]
    return Storage(posixpath.dirname(uris[0])), [Storage(u).path() for u in uris]


def decode(spec: DatasetSpec, rows: ray.data.Dataset) -> ray.data.Dataset:
    return rows.map_batches(
        decode_batch, fn_kwargs={"settings": spec.settings}, batch_size=spec.batch_size, batch_format="numpy"
    )


def build_dataset(
    spec: DatasetSpec, split: str, epoch=0, augment: bool | None = None, balance: bool | None = None, epochs: int = 1
) -> ray.data.Dataset:
    """The model-ready stream of one split. Train: `epochs` epochs per pass (see the module
    docstring), augmented, balanced, files shuffled per epoch."""
    train = split == "train"
    augment = train if augment is None else augment
    balance = train if balance is None else balance
    rows = read_epochs(spec, epochs, epoch) if train else read_decoded(spec, split, None)
    ds = rows.map_batches(keep_usable, batch_size=spec.batch_size, batch_format="numpy")
    if augment:
        ds = ds.map_batches(
            augment_batch,
            batch_size=spec.batch_size,
            batch_format="numpy",
            fn_kwargs={
                "cfg": spec.augment,
                "seed": spec.seed,
                "epoch": epoch,
                "sample_rate": spec.settings.sample_rate,
            },
        )
    if balance:
        ds = ds.map_batches(
            balance_batch,
            batch_size=spec.batch_size,
            batch_format="numpy",
            fn_kwargs={"multiplicity": spec.multiplicity, "weights": spec.weights, "seed": spec.seed, "epoch": epoch},
        )
    return ds.map_batches(
        tensor_batch,
        batch_size=spec.batch_size,
        batch_format="numpy",
        fn_kwargs={
            "tokenizer_json": spec.tokenizer_json,
            "answers": tuple(spec.answers),
            "max_text_len": spec.max_text_len,
        },
    )


def limit_data_cpus(cpus: float, progress_bars: bool = True) -> None:
    """Cap the CPUs Ray Data takes in this process's executions, so train workers keep theirs;
    no spinning while the consumer is the bottleneck (`pipelines.patches.IdleBackoff`).
    Per-operator progress bars off: from a stage task they reach the driver as log lines.
    `progress_bars=False` turns the dataset's bar off too: a training stream's bar counts the
    rows of every epoch of a pass, which a time or step budget ends long before (the training
    loop prints its own progress instead)."""
    ctx = ray.data.DataContext.get_current()
    install_idle_backoff(ctx)
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(cpu=cpus)
    ctx.enable_operator_progress_bars = False
    ctx.enable_progress_bars = progress_bars
