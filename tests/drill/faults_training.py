"""Training faults (slow: `make drill` only): a train worker killed mid-run, the disk filling
while a checkpoint is written. Both run the real train stage (Ray Train, 2 DeepSpeed ZeRO-2
workers on gloo, fp32, MLflow) on the tiny model over a prepared demo world of 240 samples.

- Killed worker: two runs without a fault give the noise floor (the tolerance); a third run
  has one worker SIGKILLed as soon as Ray registers its step-4 checkpoint (found by polling
  the run's snapshot, the pid from the GCS) and must resume from step 4 and end with weights
  within the floor of the first run's. With the train stream in order (train.deterministic)
  and the objective's generator in the checkpoint, the floor and the difference are 0.
- Disk full: the run's checkpoint folder is a tmpfs with room for one checkpoint and half of
  the next (needs root: `mount`); the step-8 write fails, the stage ends with one line, the
  step-4 checkpoint's files hash as they did when it was registered, and a re-run after the
  tmpfs grows ("space comes back") resumes from step 4.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from tests.drill.case import Drill, Row

WORKERS = 2
STEPS = 16
CHECKPOINT_EVERY = 4
KILL_AFTER = 4  # a worker dies as soon as the checkpoint of this step is registered

TRAIN = [
    "train.model.size=tiny",
    "train.model.image_encoder=vit",
    "train.model.overrides={}",
    f"train.workers={WORKERS}",
    "train.zero_stage=2",
    "train.precision=fp32",  # bf16 is emulated (slow) on CPUs without native bf16
    "train.micro_batch=8",
    "train.lr=3e-3",
    "train.warmup_steps=2",
    "train.max_minutes=null",  # steps, not minutes: the schedule must not depend on wall time
    f"train.max_steps={STEPS}",
    f"train.checkpoint_every={CHECKPOINT_EVERY}",
    "train.log_every=1",
    "train.val_every=1000",
    "train.shuffle_buffer=64",
    "train.stream_epochs=1",
    "train.seed=3",
    "train.deterministic=true",  # the case is about exact resume, whatever the base config says
]


def world_overrides(root: Path) -> list[str]:
    from tests.conftest import NO_COMPRESSION

    return [
        f"storage.root={root / 'storage'}",
        f"mlflow.local_store={root / 'runs'}",
        "ingest.demo.num_samples=240",
        "ingest.samples_per_part=120",
        "shard.samples_per_shard=32",
        "shard.splits={train: 0.8, val: 0.1, test: 0.1}",
        "prepare.image_size=32",
        "prepare.preview_samples=2",
        *NO_COMPRESSION,
        *TRAIN,
    ]


def run(root: Path, *extra: str, **options):
    from pipelines.config import load_config
    from pipelines.runner import run_pipeline
    from tests.conftest import DEMO_CONFIG

    cfg = load_config(DEMO_CONFIG, [*world_overrides(root), *extra])
    return run_pipeline(cfg, echo=lambda line: None, **options)


@dataclass
class Trained:
    state: dict[str, torch.Tensor]  # the saved model's weights
    resumed_from: list[int]  # resumed_from_step of each training session, in order
    steps: int
    outcome: object  # the pipeline's outcome (PipelineOutcome)


def train(root: Path, *extra: str, force: bool = False) -> Trained:
    """Run the train stage on the prepared world; it must finish."""
    from mlflow import MlflowClient

    from model.io import load
    from pipelines.storage import Storage

    outcome = run(root, *extra, only=["train"], force=force)
    if outcome.status != "FINISHED":
        raise RuntimeError(f"train did not finish: {outcome.failure}")
    stage = outcome.by_name()["train"]
    steps = int(MlflowClient(outcome.tracking_uri).get_run(stage.run_id).data.metrics["steps"])
    state = load(Storage(stage.output_uri).child("model").local_path()).model.state_dict()
    return Trained({k: v.detach().clone() for k, v in state.items()}, resumed_steps(outcome), steps, outcome)


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |a - b| over every weight, ||a - b|| / ||b|| over all weights as one vector)."""
    keys = sorted(b)
    flat_a = torch.cat([a[k].double().flatten() for k in keys])
    flat_b = torch.cat([b[k].double().flatten() for k in keys])
    delta = flat_a - flat_b
    return float(delta.abs().max()), float(delta.norm() / flat_b.norm())


def prepare_world(scratch: Path) -> str:
    """The URI of the prepared data's folder (dataset_spec.json) of the demo world under scratch."""
    outcome = run(scratch, only=["ingest", "shard", "prepare"])
    if outcome.status != "FINISHED":
        raise RuntimeError(f"the demo world was not prepared: {outcome.failure}")
    return outcome.by_name()["prepare"].output_uri


def latest_registered_step(snapshot: Path) -> int | None:
    """The step of the newest checkpoint Ray Train has registered in a run's snapshot (the one
    a restarted worker group resumes from); None while there is none or it is being written."""
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    return None if latest is None else latest["metrics"].get("step")


def train_worker_pids() -> list[int]:
    """Pids of this cluster's live Ray Train workers, from the GCS (the state API needs the
    dashboard, which the drill's cluster does not start)."""
    from ray._private import state

    actors = state.actors().values()
    return sorted(a["Pid"] for a in actors if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE")


class Killer(threading.Thread):
    """SIGKILL one train worker as soon as Ray Train has registered the checkpoint of `step` in
    a run folder under `runs` that did not exist before (polls the snapshot: no fixed sleep)."""

    def __init__(self, runs: Path, step: int):
        super().__init__(daemon=True)
        self.runs, self.step, self.stop = runs, step, threading.Event()
        self.known = set(runs.glob("*/checkpoint_manager_snapshot.json"))
        self.killed: int | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            fresh = set(self.runs.glob("*/checkpoint_manager_snapshot.json")) - self.known
            if any(latest_registered_step(s) == self.step for s in fresh):
                pids = train_worker_pids()
                if pids:
                    self.killed = pids[-1]
                    os.kill(self.killed, signal.SIGKILL)
                    return
            self.stop.wait(0.05)


def steps_before_restart(outcome) -> int:
    """The last step rank 0 logged before the worker group was restarted."""
    from mlflow import MlflowClient

    client = MlflowClient(outcome.tracking_uri)
    run_id = outcome.by_name()["train"].run_id
    steps = [m.step for m in sorted(client.get_metric_history(run_id, "loss.total"), key=lambda m: m.timestamp)]
    restart = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), len(steps))
    return steps[restart - 1]


def killed_worker(scratch: Path) -> list[Row]:
    root = scratch
    prepare_world(scratch)
    first = train(root)
    second = train(root, force=True)  # the same seed and config again: the noise floor
    killer = Killer(root / "storage" / "ray_train", KILL_AFTER)
    killer.start()
    try:  # max_failures 2 (not 1): another identity, so another Ray Train run than the two above
        killed = train(root, "train.max_failures=2")
    finally:
        killer.stop.set()
        killer.join()
    # The tolerance is the noise floor: what two runs without a kill differ by (0 when the
    # stream's order is fixed, train.deterministic); the killed run is held to it.
    floor_max, floor_rel = difference(second.state, first.state)
    kill_max, kill_rel = difference(killed.state, first.state)
    other_max, other_rel = difference(killed.state, second.state)
    at = steps_before_restart(killed.outcome) if killer.killed else None
    print(
        f"killed worker {killer.killed} at step {at}: no-kill vs no-kill max|d| {floor_max:.3g} rel {floor_rel:.3g}; "
        f"kill vs no-kill #1 max|d| {kill_max:.3g} rel {kill_rel:.3g}; vs #2 max|d| {other_max:.3g} "
        f"rel {other_rel:.3g}; resumed {killed.resumed_from}",
        flush=True,
    )
    resumed = killed.resumed_from[1] if len(killed.resumed_from) == 2 else None
    finished = killer.killed is not None and killed.steps == STEPS and resumed == KILL_AFTER
    passed = finished and kill_max <= floor_max
    return [
        Row(
            "train worker killed",
            f"SIGKILL 1 of {WORKERS} train workers once the step-{KILL_AFTER} checkpoint is registered "
            f"({STEPS} steps, a checkpoint every {CHECKPOINT_EVERY})",
            "resumes from that checkpoint; final model equals a no-kill run's within the noise floor "
            "(two no-kill runs, same seed)",
            f"killed at step {at}, resumed from step {resumed}, {killed.steps} steps; vs no-kill: "
            f"max|d| {kill_max:.2g}, rel L2 {kill_rel:.2g} (floor: max|d| {floor_max:.2g}, rel L2 {floor_rel:.2g})",
            passed,
        )
    ]


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def checkpoint_bytes(prepared: str) -> int:
    """About what one ZeRO checkpoint of the drill's model takes: fp32 weights, and the
    optimizer's fp32 master copy and two Adam moments (16 bytes a parameter), plus small files."""
    from model.multimodal import CrossModalModel
    from model.tokenizer import Tokenizer
    from pipelines.config.train import TrainConfig, model_config_for
    from pipelines.data.spec import DatasetSpec
    from pipelines.storage import Storage

    spec = DatasetSpec(**Storage(prepared).child("dataset_spec.json").read_json())
    cfg = TrainConfig(model={"size": "tiny", "image_encoder": "vit"})
    model = CrossModalModel(model_config_for(cfg, spec, Tokenizer.from_json(spec.tokenizer_json)))
    return 16 * sum(p.numel() for p in model.parameters()) + 200_000


def mount_tmpfs(folder: Path, size: int, remount: bool = False) -> str | None:
    """None when done, else why not (mounting needs root or CAP_SYS_ADMIN)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"{'remount,' if remount else ''}size={size}"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


class Watcher(threading.Thread):
    """Hashes the files of the checkpoint of `step` as soon as Ray Train registers it."""

    def __init__(self, runs: Path, step: int):
        super().__init__(daemon=True)
        self.runs, self.step, self.stop = runs, step, threading.Event()
        self.folder: Path | None = None
        self.hashes: dict[str, str] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            for snapshot in self.runs.glob("*/checkpoint_manager_snapshot.json"):
                if latest_registered_step(snapshot) == self.step:
                    name = json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
                    self.folder = snapshot.parent / name
                    self.hashes = file_hashes(self.folder)
                    return
            self.stop.wait(0.05)


DISK_STEPS = 12  # checkpoints at 4 (fits), 8 (fills the disk mid-write) and 12


def disk_full(scratch: Path) -> list[Row]:
    prepared = prepare_world(scratch)
    runs = scratch / "storage" / "ray_train"  # where the train stage's checkpoints go
    size = checkpoint_bytes(prepared) * 3 // 2  # room for one checkpoint and half of the next
    why = mount_tmpfs(runs, size)
    done = f"checkpoints on a {size / 1e6:.0f} MB tmpfs: step 4's fits, step 8's fills it mid-write"
    expected = (
        "a one-line error naming the full disk; no half-written folder kept; step 4's files byte-identical; "
        "a re-run with space resumes from step 4"
    )
    if why:
        return [Row("disk full at a checkpoint", done, expected, f"could not mount a tmpfs: {why}", False)]
    extra = (f"train.max_steps={DISK_STEPS}", "train.max_failures=1")
    try:
        watcher = Watcher(runs, CHECKPOINT_EVERY)
        watcher.start()
        try:
            failed = run(scratch, *extra, only=["train"])
        finally:
            watcher.stop.set()
            watcher.join()
        message = failed.by_name()["train"].error if failed.status != "FINISHED" else None
        message = message and message.replace(str(scratch), "<scratch>")
        kept = watcher.folder
        intact = kept is not None and file_hashes(kept) == watcher.hashes
        partial = sorted(p.name for p in kept.parent.glob("checkpoint_*/") if p != kept) if kept else []
        mount_tmpfs(runs, 64 * size, remount=True)  # space comes back
        again = run(scratch, *extra, only=["train"])
        removed = not any((kept.parent / name).exists() for name in partial) if kept else False
    finally:
        subprocess.run(["umount", "-l", str(runs)], capture_output=True)
    resumed = resumed_steps(again)
    print(f"disk full: {message!r}; intact {intact}; other folders {partial}; re-run {again.status} {resumed}")
    clear = message is not None and "No space left on device" in message and "\n" not in message
    passed = clear and intact and removed and again.status == "FINISHED" and resumed == [CHECKPOINT_EVERY]
    return [
        Row(
            "disk full at a checkpoint",
            done,
            expected,
            f"stage failed: {message}; step-{CHECKPOINT_EVERY} checkpoint ({len(watcher.hashes)} files) "
            f"{'byte-identical' if intact else 'changed or missing'}; half-written folders after the failure: "
            f"{len(partial)}{'' if not partial else ', removed by the re-run' if removed else ', kept'}; the re-run "
            f"{again.status.lower()}, resumed from step {resumed[0] if resumed else None}",
            passed,
        )
    ]


def resumed_steps(outcome) -> list[int]:
    """resumed_from_step of each training session of the outcome's train stage."""
    from mlflow import MlflowClient

    stage = outcome.by_name().get("train")
    if stage is None or stage.run_id is None:
        return []
    history = MlflowClient(outcome.tracking_uri).get_metric_history(stage.run_id, "resumed_from_step")
    return [int(m.value) for m in sorted(history, key=lambda m: m.timestamp)]


DRILLS = [
    Drill("train-worker-killed", "fault", killed_worker, slow=True, needs_ray=True),
    Drill("checkpoint-disk-full", "fault", disk_full, slow=True, needs_ray=True),
]
