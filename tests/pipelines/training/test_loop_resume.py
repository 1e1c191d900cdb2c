"""The training loop's position in a multi-epoch stream: where passes start, what a resume skips.

One process, real DeepSpeed (ZeRO-2, gloo), the tiny model on synthetic batches; the data is a
function of the epoch a pass starts at, so the test sees exactly what the loop asked for.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port

EPOCHS_PER_PASS, BATCHES_PER_EPOCH = 3, 4


def run_loop(max_steps: int, checkpoints: Path, resume_from: Path | None) -> tuple[dict, dict]:
    """(what the loop asked for and logged, the model's final weights)."""
    from model.config import model_config
    from model.multimodal import CrossModalModel
    from model.synthetic import synthetic_batch
    from pipelines.config.train import TrainConfig
    from pipelines.training.loop import Data, Sink, train

    model_cfg = model_config("tiny", num_answers=5)
    record = {"passes": [], "yielded": [], "logged": {}}

    def train_epoch(first_epoch: int):
        record["passes"].append(first_epoch)
        for epoch in range(first_epoch, first_epoch + EPOCHS_PER_PASS):
            for index in range(BATCHES_PER_EPOCH):
                record["yielded"].append([epoch, index])
                yield {**synthetic_batch(model_cfg, 4, seed=epoch * 100 + index), "epoch": torch.full((4,), epoch)}

    def save(folder: Path, metrics: dict) -> None:
        shutil.copytree(folder, checkpoints / f"step{metrics['step']}")

    def log(metrics: dict, step: int) -> None:
        for key in ("epoch", "resumed_from_step"):
            if key in metrics:
                record["logged"].setdefault(key, []).append([step, metrics[key]])

    cfg = TrainConfig(
        zero_stage=2,
        precision="bf16",
        micro_batch=4,
        max_steps=max_steps,
        checkpoint_every=6,
        log_every=1,
        val_every=1000,
        warmup_steps=0,
    )
    torch.manual_seed(0)
    model = CrossModalModel(model_cfg)
    progress = train(model, cfg, Data(train_epoch), Sink(log, save, lambda: resume_from), 0, 1)
    record["step"] = progress.step
    return record, {k: v.detach().clone() for k, v in model.state_dict().items()}


def worker(rank: int, folder: str, port: int) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pipelines.training.engine import import_deepspeed

    import_deepspeed().init_distributed(dist_backend="gloo")
    checkpoints = Path(folder) / "checkpoints"
    first, unbroken = run_loop(14, checkpoints, None)
    resumed, weights = run_loop(14, Path(folder) / "unused", checkpoints / "step6")
    Path(folder, "result.json").write_text(json.dumps({"first": first, "resumed": resumed}))
    torch.save({"unbroken": unbroken, "resumed": weights}, Path(folder) / "weights.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One unbroken run of 14 steps, and one resumed from its step-6 checkpoint to step 14."""
    folder = tmp_path_factory.mktemp("resume")
    mp.spawn(worker, args=(str(folder), free_port()), nprocs=1, join=True)
    return folder


@pytest.mark.spawn
def test_a_resumed_run_starts_its_pass_at_the_checkpoints_epoch(runs):
    result = json.loads((runs / "result.json").read_text())
    first, resumed = result["first"], result["resumed"]
    # 12 batches a pass (3 epochs of 4): the second pass starts where the first one ended.
    assert first["passes"] == [0, 3] and first["step"] == 14
    assert [epoch for _, epoch in first["logged"]["epoch"]] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 2
    # The step-6 checkpoint was 2 batches into epoch 1: the resumed pass starts at epoch 1 (not
    # at the pass's epoch 0) and skips those 2 batches, then trains on from the third.
    assert resumed["logged"]["resumed_from_step"] == [[6, 6]]
    assert resumed["passes"] == [1]
    assert resumed["yielded"][:6] == [[1, 0], [1, 1], [1, 2], [1, 3], [2, 0], [2, 1]]
    assert resumed["logged"]["epoch"][:4] == [[7, 1], [8, 1], [9, 2], [10, 2]] and resumed["step"] == 14
    assert resumed["logged"]["epoch"] == first["logged"]["epoch"][6:]  # steps 7-14: the same epochs


@pytest.mark.spawn
def test_a_resumed_run_ends_with_the_weights_of_an_unbroken_one(runs):
    """Deterministic resume: weights, optimizer, schedule, data position and every random state
    (the objective's generator for masks, negatives and modality dropout included) come back
    from the checkpoint, so steps 7-14 after a resume are bit for bit those of the unbroken run."""
    weights = torch.load(runs / "weights.pt", weights_only=True)
    unbroken, resumed = weights["unbroken"], weights["resumed"]
    assert unbroken.keys() == resumed.keys()
    differ = [name for name in unbroken if not torch.equal(unbroken[name], resumed[name])]
    assert not differ, f"{len(differ)} of {len(unbroken)} weights differ, e.g. {differ[:3]}"
