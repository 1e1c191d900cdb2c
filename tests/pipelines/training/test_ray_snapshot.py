"""Ray Train's run snapshot, written by a rename (`pipelines.patches.write_snapshot_atomically`).

The snapshot lists the checkpoints Ray registered: a restarted or re-run training resumes from
the newest. Ray writes it in place; a write that fails part-way (here a file may not grow past
64 bytes, as on a disk that filled) left it cut, and the run could never resume.
"""

from __future__ import annotations

import json
import multiprocessing

import pytest

SNAPSHOT = "checkpoint_manager_snapshot.json"


def write_twice(folder: str, patched: bool, result) -> None:
    """Write a run's snapshot with room, then again with 64 bytes of room; put what it raised."""
    import resource
    import signal

    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    from pipelines.patches import patch_ray_train

    if patched:
        patch_ray_train()
    manager = CheckpointManager(CheckpointConfig(), StorageContext(storage_path=folder, experiment_dir_name="run"))
    manager._write_state_to_storage()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        manager._write_state_to_storage()
        result.put("written")
    except OSError as err:
        result.put(f"OSError errno {err.errno}")


def failed_write(tmp_path, patched: bool) -> str:
    context = multiprocessing.get_context("spawn")
    result = context.Queue()
    child = context.Process(target=write_twice, args=(str(tmp_path), patched, result))
    child.start()
    outcome = result.get(timeout=120)
    child.join(timeout=60)
    return outcome


@pytest.mark.spawn
def test_a_snapshot_write_that_fails_leaves_the_previous_snapshot_whole(tmp_path):
    assert failed_write(tmp_path, patched=True) == "OSError errno 27"  # EFBIG: the write did fail
    snapshot = json.loads((tmp_path / "run" / SNAPSHOT).read_text())
    assert snapshot["checkpoint_results"] == [] and "ray_version" in snapshot
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".validate_storage_marker", SNAPSHOT]


@pytest.mark.spawn
def test_rays_own_write_leaves_a_cut_snapshot_the_reason_for_the_patch(tmp_path):
    assert failed_write(tmp_path, patched=False) == "OSError errno 27"
    cut = (tmp_path / "run" / SNAPSHOT).read_text()
    assert len(cut) == 64
    with pytest.raises(ValueError):
        json.loads(cut)
