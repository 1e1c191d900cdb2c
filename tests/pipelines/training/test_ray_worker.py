"""The Ray Train worker's checkpoint report (`pipelines.training.ray_worker.report`) on a real
Ray Train run of one worker, whose checkpoint write fails part-way: one of its files cannot be
created (a folder of that name is in the way), as one cannot on a disk that filled."""

from __future__ import annotations

from pathlib import Path

import pytest


def write_a_checkpoint(config: dict) -> None:
    import tempfile

    from pipelines.storage import Storage
    from pipelines.training.ray_worker import report

    folder = Path(tempfile.mkdtemp())
    (folder / "latest").write_text("step3")
    (folder / "optim_states.pt").write_bytes(bytes(1 << 20))
    report(folder, {"step": 3}, run=Storage(config["run"]))


def test_a_checkpoint_that_cannot_be_written_is_removed_and_named(tmp_path, ray_cluster):
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from pipelines.training.ray_fit import root_cause

    run = tmp_path / "ray_train" / "train-0123"
    (run / "checkpoint_step0000002").mkdir(parents=True)  # an earlier one: left alone
    (run / "checkpoint_step0000002" / "latest").write_text("step2")
    (run / "checkpoint_step0000003" / "optim_states.pt").mkdir(parents=True)  # the write fails here
    trainer = TorchTrainer(
        write_a_checkpoint,
        train_loop_config={"run": str(run)},
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name=run.name, storage_path=str(run.parent), failure_config=FailureConfig(max_failures=0)),
    )
    with pytest.raises(TrainingFailedError) as caught:
        trainer.fit()
    message = root_cause(caught.value)
    assert message.startswith("worker 0: IsADirectoryError: [Errno 21] "), message
    assert message.endswith(f"(writing the step-3 checkpoint to {run / 'checkpoint_step0000003'}, removed again)")
    assert not (run / "checkpoint_step0000003").exists()
    assert (run / "checkpoint_step0000002" / "latest").read_text() == "step2"
