"""Ray Train's set-up of a training run (`pipelines.training.ray_fit`) that needs no cluster."""

from __future__ import annotations

from pipelines.config.train import LoopConfig
from pipelines.training.ray_fit import ingest_options


def test_the_train_stream_keeps_its_order_unless_told_not_to():
    """Blocks in completion order changed which rows each worker trained on from run to run
    (the drill `train worker killed` measured two runs of the same seed apart); by default the
    stream is kept in order, with Ray Train's own ingest options (the resource limits) kept."""
    import ray.data

    assert LoopConfig().deterministic
    ordered = ingest_options(True)
    assert ordered.preserve_order
    assert ordered.resource_limits == ray.data.DataContext.get_current().execution_options.resource_limits
    assert not ingest_options(False).preserve_order


def checkpoint_run(tmp_path, snapshot: str | None, folders: list[str]):
    from pipelines.storage import Storage

    run = tmp_path / "train-0123"
    for name in folders:
        (run / name).mkdir(parents=True)
        (run / name / "latest").write_text("step8")
    if snapshot is not None:
        (run / "checkpoint_manager_snapshot.json").write_text(snapshot)
    return run, Storage(str(run))


def snapshot_of(*registered: str, pending: tuple[str, ...] = ()) -> str:
    import json

    def result(name: str) -> dict:
        return {"version": 0, "checkpoint_dir_name": name, "metrics": {"step": 4}}

    return json.dumps(
        {
            "checkpoint_results": [result(n) for n in registered],
            "latest_checkpoint_result": result(registered[-1]) if registered else None,
            "pending_training_results": [result(n) for n in pending],
        }
    )


def test_checkpoint_folders_ray_never_registered_are_removed(tmp_path):
    """A worker that died, or a disk that filled, mid-write leaves a folder the snapshot does not
    list: it goes; the registered ones (and one waiting for validation) stay as they were."""
    from pipelines.training.ray_fit import remove_unregistered

    folders = ["checkpoint_a", "checkpoint_b", "checkpoint_c", "checkpoint_d"]
    run, storage = checkpoint_run(
        tmp_path, snapshot_of("checkpoint_a", "checkpoint_c", pending=("checkpoint_d",)), folders
    )
    assert remove_unregistered(storage) == ["checkpoint_b"]
    assert sorted(p.name for p in run.glob("checkpoint_*/")) == ["checkpoint_a", "checkpoint_c", "checkpoint_d"]
    assert (run / "checkpoint_a" / "latest").read_text() == "step8"


def test_without_a_snapshot_every_checkpoint_folder_is_unregistered(tmp_path):
    from pipelines.training.ray_fit import remove_unregistered

    run, storage = checkpoint_run(tmp_path, None, ["checkpoint_a"])
    assert remove_unregistered(storage) == ["checkpoint_a"] and not list(run.glob("checkpoint_*/"))


def test_an_unreadable_snapshot_leaves_every_folder_alone(tmp_path):
    from pipelines.training.ray_fit import remove_unregistered

    run, storage = checkpoint_run(tmp_path, '{"checkpoint_res', ["checkpoint_a", "checkpoint_b"])
    assert remove_unregistered(storage) == []
    assert len(list(run.glob("checkpoint_*/"))) == 2
    assert remove_unregistered(checkpoint_run(tmp_path / "none", None, [])[1]) == []  # no run folder yet


def test_a_worker_that_ran_out_of_disk_names_the_cause_and_where_the_checkpoints_are():
    """Ray Train raises a WorkerGroupError whose own text is 'Training failed due to worker
    errors'; the stage's one line names the worker, the original exception and the folder."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from pipelines.training.ray_fit import failure_message

    full = OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    wrapped = UserExceptionWithTraceback(full, f"Traceback (most recent call last):\n  ...\nOSError: {full}\n")
    error = WorkerGroupError("Training failed due to worker errors", {1: wrapped, 0: wrapped})
    message = failure_message(error, "/data/ray_train/train-0123")
    assert message.startswith("worker 0: OSError: [Errno 28] Error writing bytes to file.")
    assert "the newest complete checkpoint in /data/ray_train/train-0123 is kept" in message and "\n" not in message
    assert failure_message(WorkerGroupError("x", {0: ValueError("bad\nvalue")}), "/c") == "worker 0: ValueError: value"
