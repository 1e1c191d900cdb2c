"""The training loop: DeepSpeed engine, multi-task step, validation, checkpoints, resume.

It knows nothing of Ray or MLflow. The caller hands it:
- `Data`: this rank's train batches for a pass over the stream (one or more data epochs, from
  a given epoch on), and its part of the validation set;
- `Sink`: where metrics go (rank 0 logs), where a checkpoint goes, where to resume from.
All ranks run the same number of steps in lockstep (DeepSpeed's collectives need it): each
pass's data is split equally, and the time budget is agreed with an all-reduce. A resumed run
starts a pass at the epoch its checkpoint was in and skips the batches of that epoch it had
trained on (to within a batch and the local shuffle buffer), not the whole pass.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from model.objectives import nothing_applies
from pipelines.config.train import LoopConfig
from pipelines.evaluation.collect import collect, gather
from pipelines.evaluation.report import evaluation_metrics
from pipelines.training.engine import DTYPES, Budget, cast_batch, initialize, load_rng, resolve_precision, save_rng

PRINT_EVERY_S = 30.0  # a progress line on stdout at most this often (rank 0); MLflow gets every log_every


@dataclass
class Data:
    train_epoch: Callable[[int], Iterable[dict]]  # first epoch -> this rank's model batches of a pass from there
    val: Callable[[], Iterable[dict]] | None = None  # this rank's part of the validation set


@dataclass
class Sink:
    log: Callable[[dict[str, float], int], None]  # called on rank 0 only
    save: Callable[[Path, dict[str, float]], None]  # every rank: persist this local checkpoint folder
    latest: Callable[[], Path | None]  # a local folder of the checkpoint to resume from, if any
    log_config: Callable[[dict], None] = lambda ds_config: None


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    pass_start: int = 0  # the first data epoch of the pass being read
    batch_in_pass: int = 0  # micro-batches of this pass trained on (a resumed pass skips them)
    data_epoch: int = 0  # the data epoch of the latest batch (logged as `epoch`)
    epoch_batches: int = 0  # micro-batches of `data_epoch` trained on
    samples: int = 0  # samples trained on, all ranks
    train_seconds: float = 0.0
    history: list = field(default_factory=list)  # (step, validation metrics)


def control_group():
    """A gloo group for the loop's own small agreements (the time budget, who ran out of data):
    a CPU reduce there never waits for the GPU's queued work, as one over NCCL would (NCCL also
    reduces no CPU tensors). None when there is no one to agree with."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo")


def agreed_max(value: float, group) -> float:
    """The largest of every rank's value (ranks' clocks differ slightly; decisions must not)."""
    if group is None:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return float(tensor.item())


def in_lockstep(batches, group):
    """Stop every rank as soon as one runs out: DeepSpeed's collectives need equal step counts.
    Ray Data's equal split is not enough on its own: on a train split of a dozen samples the
    ranks' passes came out a batch apart, one rank started its next pass (a barrier) while the
    other stepped (an all-reduce), and gloo aborted the process. `group`: a gloo control
    group (None: one rank, nothing to agree on)."""
    for batch in batches:
        if group is not None and not agree(1.0, group):
            return
        yield batch
    if group is not None:
        agree(0.0, group)  # this rank ran out: tell the others, who are waiting at their next batch


def agree(flag: float, group) -> bool:
    tensor = torch.tensor([flag])
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group)
    return tensor.item() == 1.0


def train(model, cfg: LoopConfig, data: Data, sink: Sink, rank: int, world: int, objective=None) -> Progress:
    """`objective`: the loss (default: the multi-task objective of `cfg.losses`); distillation
    hands in one that adds the teacher's."""
    budget = Budget()
    control = control_group()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = resolve_precision(cfg, device, lambda flag: agreed_max(-float(flag), control) < 0)  # all ranks: yes
    engine, ds_config = initialize(model, cfg, world, budget if cfg.max_minutes else None, objective)
    dtype = DTYPES[cfg.precision]
    if rank == 0:
        sink.log_config(ds_config)
        print(f"train: precision {cfg.precision}", flush=True)
    # On the engine's device: the objective draws masks and negatives where the batch is.
    generator = torch.Generator(device=engine.device).manual_seed(cfg.seed * 1000 + rank)
    progress = resume(engine, sink, rank, generator)
    if rank == 0:  # where this session starts: 0, or the step of the checkpoint it resumed from
        sink.log({"resumed_from_step": progress.step}, progress.step)
    drill = cfg.fault.rank == rank and cfg.fault.step is not None and progress.step == 0
    window_start, window_samples = time.perf_counter(), 0
    session_start, before = time.perf_counter(), progress.train_seconds
    last_printed = session_start
    paced_from = None  # (step, seconds) of the session's first logged step: the pace is measured from it
    last_saved = progress.step

    def elapsed() -> float:
        return before + time.perf_counter() - session_start

    while progress.step < cfg.max_steps:
        engine.train()
        index = -1
        for index, batch in enumerate(data.train_epoch(progress.pass_start)):
            if index < progress.batch_in_pass:
                continue  # resuming: this part of the pass was trained on before the checkpoint
            epoch = int(batch.pop("epoch").max()) if "epoch" in batch else progress.pass_start
            progress.epoch_batches = progress.epoch_batches + 1 if epoch == progress.data_epoch else 1
            progress.data_epoch = epoch
            loss, parts = engine(cast_batch(batch, dtype), generator)
            if index == progress.batch_in_pass:  # a pass's first step: read back once (see check_applies)
                check_applies({k: float(v) for k, v in parts.items()})
            engine.backward(loss)
            if cfg.max_minutes:  # one scalar all-reduce per step, only when there is a budget
                budget.fraction = agreed_max(elapsed(), control) / (cfg.max_minutes * 60)
            engine.step()
            progress.batch_in_pass = index + 1
            progress.samples += batch["weight"].shape[0] * world
            window_samples += batch["weight"].shape[0] * world
            if engine.global_steps == progress.step:
                continue  # accumulating gradients: no optimizer step yet
            progress.step = engine.global_steps
            if drill and progress.step == cfg.fault.step:
                os.kill(os.getpid(), signal.SIGKILL)  # fault drill: this worker dies right here
            if progress.step % cfg.log_every == 0 and rank == 0:
                now = time.perf_counter()
                losses = {f"loss.{k}": float(v) for k, v in parts.items()}  # the only sync of the step's losses
                check_applies(losses)
                sink.log(
                    {
                        **{k: v for k, v in losses.items() if v == v},
                        "lr": engine.get_lr()[0],  # v == v: not NaN
                        "samples_per_s": window_samples / (now - window_start),
                        "epoch": progress.data_epoch,
                    },
                    progress.step,
                )
                seconds = elapsed()
                paced_from = paced_from or (progress.step, seconds)  # the first steps wait for the data
                if now - last_printed >= PRINT_EVERY_S or progress.step == cfg.log_every:
                    done, took = progress.step - paced_from[0], seconds - paced_from[1]
                    pace = done / took if done > 0 and took > 0 else None
                    line = progress_line(
                        cfg, progress.step, seconds, losses["loss.total"], window_samples / (now - window_start), pace
                    )
                    print(line, flush=True)
                    last_printed = now
                window_start, window_samples = now, 0
            if data.val and progress.step % cfg.val_every == 0:
                validate(engine, data, dtype, sink, rank, progress)
            out_of_time = budget.fraction >= 1.0
            if progress.step % cfg.checkpoint_every == 0 or progress.step >= cfg.max_steps or out_of_time:
                progress.train_seconds = elapsed()
                checkpoint(engine, sink, rank, progress, generator)
                last_saved = progress.step
            if progress.step >= cfg.max_steps or out_of_time:
                return finish(engine, data, dtype, sink, rank, progress, last_saved, generator)
        if index < 0:  # would loop over empty passes forever
            raise ValueError(
                f"a pass over the train stream gave no full micro-batch of {cfg.micro_batch} on rank "
                f"{rank}: too few train samples per worker; lower train.micro_batch"
            )
        progress.pass_start, progress.batch_in_pass = progress.data_epoch + 1, 0
    return finish(engine, data, dtype, sink, rank, progress, last_saved, generator)


def check_applies(losses: dict[str, float]) -> None:
    """The step's losses are read back only at a pass's first step and at logged steps (on a GPU
    every read stops the host queueing work ahead): there, a batch no task applied to stops
    the run, as it says the data cannot train this model (e.g. text alone, without questions)."""
    if nothing_applies(losses):
        raise ValueError(
            "no objective applies to this batch: it needs two modalities of a sample, a caption "
            "with an image or audio, or a question (see the data's modality counts)"
        )


def progress_line(
    cfg: LoopConfig, step: int, seconds: float, loss: float, samples_per_s: float, pace: float | None = None
) -> str:
    """'train: step 120 of about 520 (9 min budget) | 2.1 of 9.0 min | about 6.9 min left | loss
    2.310 | 98 samples/s': the budget that ends training first (steps, or minutes at `pace`
    steps a second, by default the pace so far) sets the step count shown and the time left."""
    pace = pace or step / max(seconds, 1e-6)
    left = (cfg.max_steps - step) / max(pace, 1e-9)
    total, budget = str(cfg.max_steps), ""
    if cfg.max_minutes:
        budget = f" | {seconds / 60:.1f} of {cfg.max_minutes:g} min"
        if cfg.max_minutes * 60 - seconds < left:  # the clock ends it first
            left = cfg.max_minutes * 60 - seconds
            total = f"about {step + pace * max(left, 0):.0f} ({cfg.max_minutes:g} min budget)"
    return (
        f"train: step {step} of {total}{budget} | about {max(left, 0) / 60:.1f} min left | "
        f"loss {loss:.3f} | {samples_per_s:.0f} samples/s"
    )


def finish(engine, data, dtype, sink, rank, progress: Progress, last_saved: int, generator=None) -> Progress:
    if data.val and (not progress.history or progress.history[-1][0] != progress.step):
        validate(engine, data, dtype, sink, rank, progress)
    if last_saved != progress.step:
        checkpoint(engine, sink, rank, progress, generator)
    return progress


def validate(engine, data: Data, dtype, sink: Sink, rank: int, progress: Progress) -> dict:
    engine.eval()
    # The evaluate stage's scoring, on its cheap parts: no generation (see pipelines/evaluation).
    metrics = evaluation_metrics(gather(collect(engine.module.model, data.val(), dtype=dtype)))
    engine.train()
    if rank == 0:
        sink.log({f"val.{k}": v for k, v in metrics.items()}, progress.step)
    progress.history.append((progress.step, metrics))
    return metrics


def checkpoint(engine, sink: Sink, rank: int, progress: Progress, generator=None) -> None:
    """Every rank writes its ZeRO shard, its RNG state (the objective's `generator` too) and the
    loop position into one folder."""
    state = {
        "step": progress.step,
        "data_epoch": progress.data_epoch,
        "epoch_batches": progress.epoch_batches,
        "samples": progress.samples,
        "train_seconds": progress.train_seconds,
    }
    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=f"step{progress.step}", client_state={"progress": state})
        save_rng(Path(folder), rank, generator)
        sink.save(Path(folder), {"step": progress.step, "epoch": progress.data_epoch})


def resume(engine, sink: Sink, rank: int, generator: torch.Generator | None = None) -> Progress:
    """The loop's position from the latest checkpoint (a fresh Progress without one). With the
    weights, optimizer, schedule, data position and every random state restored, a resumed run
    trains on exactly as an unbroken one would (the drill `train worker killed` measures it)."""
    folder = sink.latest()
    if folder is None:
        return Progress()
    _, client_state = engine.load_checkpoint(str(folder))
    state = client_state["progress"]
    if not load_rng(folder, rank, generator) and generator is not None:
        # A checkpoint without the generator's state: a seed of its own for the steps after it.
        generator.manual_seed(generator.initial_seed() + state["step"])
    # The pass restarts at the checkpoint's epoch, not at the start of the pass it was in.
    return Progress(
        step=state["step"],
        pass_start=state["data_epoch"],
        batch_in_pass=state["epoch_batches"],
        data_epoch=state["data_epoch"],
        epoch_batches=state["epoch_batches"],
        samples=state["samples"],
        train_seconds=state["train_seconds"],
    )
