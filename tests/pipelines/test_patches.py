"""The library patches (pipelines/patches.py), each against the real library object it replaces,
and each refused with a warning on a version it was not written for."""

from __future__ import annotations

import inspect
import sys
from types import SimpleNamespace

import pytest
import ray.data
import torch

from pipelines import patches
from pipelines.patches import IdleBackoff, PatchSkipped, install_idle_backoff, patch_deepspeed, unscale_and_clip_grads


@pytest.fixture
def deepspeed_patched():
    from pipelines.training.engine import import_deepspeed

    import_deepspeed()
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return DeepSpeedZeroOptimizer


def test_the_clip_patch_replaces_deepspeeds_with_the_same_signature(deepspeed_patched):
    original = patches.REPLACED["DeepSpeedZeroOptimizer.unscale_and_clip_grads"]
    assert deepspeed_patched.unscale_and_clip_grads is unscale_and_clip_grads
    assert inspect.signature(original) == inspect.signature(unscale_and_clip_grads)


@pytest.mark.parametrize("norm", [10.0, 0.5, 1.0, float("inf"), float("nan"), -1.0])
@pytest.mark.parametrize("clip_grad, loss_scale", [(1.0, 1.0), (2.0, 4.0), (0.0, 8.0)])
def test_the_sync_free_clip_scales_gradients_as_deepspeeds_own(deepspeed_patched, norm, clip_grad, loss_scale):
    # DeepSpeed's rule: clip to clip_grad when the norm is over it; an invalid norm (non-finite,
    # or its -1 sentinel) scales the gradients to zero. Both functions on the same gradients.
    original = patches.REPLACED["DeepSpeedZeroOptimizer.unscale_and_clip_grads"]
    owner = SimpleNamespace(clip_grad=clip_grad, loss_scale=loss_scale, device="cpu")
    theirs = [torch.full((4,), 2.0), [torch.full((3,), -1.0)]]
    ours = [t.clone() if isinstance(t, torch.Tensor) else [t[0].clone()] for t in theirs]
    original(owner, theirs, torch.tensor(norm))
    unscale_and_clip_grads(owner, ours, torch.tensor(norm))
    assert torch.allclose(ours[0], theirs[0], rtol=1e-6) and torch.allclose(ours[1][0], theirs[1][0], rtol=1e-6)


@pytest.mark.parametrize("module", patches.NORM_MASK_USERS)
def test_the_norm_marker_is_replaced_where_deepspeed_looks_it_up(deepspeed_patched, module):
    assert sys.modules[module].mask_nan_or_inf_with_val_inplace is patches.mask_nan_or_inf_with_val_inplace
    original = patches.REPLACED[f"{module}.mask_nan_or_inf_with_val_inplace"]
    assert inspect.signature(original) == inspect.signature(patches.mask_nan_or_inf_with_val_inplace)


@pytest.mark.parametrize("norm", [3.5, 0.0, float("inf"), float("-inf"), float("nan")])
def test_the_norm_marker_marks_as_deepspeeds_own_and_reads_nothing_back(deepspeed_patched, norm):
    from model.syncs import HostSyncs

    original = patches.REPLACED["deepspeed.runtime.utils.mask_nan_or_inf_with_val_inplace"]
    theirs, ours = torch.tensor(norm), torch.tensor(norm)
    original(theirs, device="cpu")
    with HostSyncs() as syncs:
        patches.mask_nan_or_inf_with_val_inplace(ours, device="cpu")
    # (DeepSpeed's own reads nothing back on a CPU either: its two syncs are a pageable copy to
    # the GPU and the CUDA fill kernel reading its 0-dim value tensor.)
    assert torch.equal(ours, theirs) and syncs.count == 0


def test_the_shm_op_is_not_built(deepspeed_patched):
    comm = sys.modules["deepspeed.comm.torch"]
    assert callable(patches.REPLACED["deepspeed.comm.torch.build_shm_op"])  # DeepSpeed's own builder
    assert comm.build_shm_op() is None


def test_another_deepspeed_version_keeps_its_own_behaviour_with_a_warning(monkeypatch):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    before = DeepSpeedZeroOptimizer.unscale_and_clip_grads
    monkeypatch.setattr(patches, "version", lambda library: "0.20.1")
    with pytest.warns(PatchSkipped, match=r"deepspeed 0\.20\.1 is not .*clipping syncs the device"):
        assert patch_deepspeed() is False
    assert DeepSpeedZeroOptimizer.unscale_and_clip_grads is before


class Op:
    def __init__(self, submitted, finished, taken):
        self.metrics = SimpleNamespace(
            num_tasks_submitted=submitted, num_tasks_finished=finished, num_outputs_taken=taken
        )


def test_the_back_off_sleeps_only_when_no_task_or_output_moved(monkeypatch):
    naps = []
    monkeypatch.setattr(patches.time, "sleep", naps.append)
    callback = IdleBackoff()
    steps = [
        ((1, 0, 0), (0, 0, 0)),  # first step: nothing to compare with
        ((1, 0, 0), (0, 0, 0)),  # nothing moved -> sleep
        ((1, 1, 0), (0, 0, 0)),  # a task finished
        ((1, 1, 1), (0, 0, 0)),  # its output was taken downstream
        ((1, 1, 1), (1, 0, 0)),  # the next operator submitted a task
        ((1, 1, 1), (1, 0, 0)),
    ]  # back-pressured: nothing moved -> sleep
    for counts in steps:
        callback.on_execution_step(SimpleNamespace(_topology={Op(*c): None for c in counts}))
    assert naps == [patches.IDLE_SLEEP_S, patches.IDLE_SLEEP_S]


def test_an_executor_without_its_topology_turns_the_back_off_off_loudly(monkeypatch):
    naps = []
    monkeypatch.setattr(patches.time, "sleep", naps.append)
    callback = IdleBackoff()
    with pytest.warns(PatchSkipped, match="no longer exposes"):
        callback.on_execution_step(SimpleNamespace())
    callback.on_execution_step(SimpleNamespace())  # warned once, then quiet
    assert naps == [] and callback.blind


def test_installed_once_and_only_on_the_ray_it_was_written_for(monkeypatch):
    ctx = ray.data.DataContext.get_current().copy()
    assert install_idle_backoff(ctx) and install_idle_backoff(ctx)
    assert ctx.custom_execution_callback_classes.count(IdleBackoff) == 1
    assert IdleBackoff in ctx.execution_callback_classes  # what the executor instantiates
    other = ray.data.DataContext.get_current().copy()
    other.custom_execution_callback_classes = []
    monkeypatch.setattr(patches, "version", lambda library: "2.61.0")
    with pytest.warns(PatchSkipped, match="ray 2.61.0"):
        assert install_idle_backoff(other) is False
    assert IdleBackoff not in other.custom_execution_callback_classes


def test_the_back_off_reads_a_real_streaming_executor(ray_cluster, monkeypatch):
    seen = []
    step = IdleBackoff.on_execution_step

    def spy(self, executor):
        step(self, executor)
        seen.append(self.last)

    monkeypatch.setattr(IdleBackoff, "on_execution_step", spy)
    ctx = ray.data.DataContext.get_current()
    install_idle_backoff(ctx)
    rows = ray.data.range(64, override_num_blocks=4).map_batches(lambda b: b, batch_size=16).take_all()
    assert len(rows) == 64
    assert seen and all(progress is not None for progress in seen)
    assert seen[-1] and all(len(op) == 3 for op in seen[-1])  # (submitted, finished, taken) per operator


def test_a_ray_train_cleaner_thread_that_dies_says_so_on_one_line(monkeypatch, caplog):
    import threading

    from pipelines.patches import worker_setup

    seen = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    worker_setup()

    def fail():
        raise RuntimeError("Timed out while waiting for GCS to become available.\nmore detail")

    for name in ("PlacementGroupCleanerMonitor", "SomeOtherThread"):
        thread = threading.Thread(target=fail, name=name)
        thread.start()
        thread.join()
    assert [args.thread.name for args in seen] == ["SomeOtherThread"]  # others keep the default hook
    [record] = [r for r in caplog.records if "placement-group cleaner" in r.getMessage()]
    assert record.getMessage() == (
        "Ray Train's placement-group cleaner stopped monitoring (RuntimeError: Timed out while waiting for GCS "
        "to become available.); training goes on"
    )


def test_nlpaug_imports_without_transformers_and_transformers_still_imports_after():
    import subprocess

    from tests.conftest import REPO

    code = (
        "import sys; from pipelines.patches import import_nlpaug\n"
        "naw = import_nlpaug('nlpaug.augmenter.word'); nac = import_nlpaug('nlpaug.augmenter.char')\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
        "print(naw.RandomWordAug(action='swap', aug_max=1).augment('one two three four')[0])\n"
        "import transformers; print('transformers', transformers.__version__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    swapped, after = done.stdout.strip().splitlines()[-2:]
    # nlpaug capitalises a word swapped into first place (unseeded here): compare ignoring case.
    assert sorted(w.lower() for w in swapped.split()) == ["four", "one", "three", "two"]
    assert after.startswith("transformers ")


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_the_foreach_grad_norm_equals_deepspeeds_per_gradient_one(deepspeed_patched, monkeypatch, norm_type):
    from torch.distributed import ReduceOp

    stage = sys.modules["deepspeed.runtime.zero.stage_1_and_2"]
    # One rank: the reductions across ranks return what they are given.
    monkeypatch.setattr(stage, "dist", SimpleNamespace(all_reduce=lambda tensor, op, group: tensor, ReduceOp=ReduceOp))
    owner = SimpleNamespace(
        model_parallel_rank=0, dp_process_group=None, device="cpu", _model_parallel_all_reduce=lambda tensor, op: None
    )
    g = torch.Generator().manual_seed(0)
    gradients = [torch.randn(shape, generator=g).to(torch.bfloat16) for shape in [(7, 3), (16,), (1,), (5, 5, 2)]]
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in gradients]
    original = patches.REPLACED["DeepSpeedZeroOptimizer.get_grad_norm_direct"]
    theirs = original(owner, gradients, params, norm_type)
    ours = patches.get_grad_norm_direct(owner, gradients, params, norm_type)
    assert torch.allclose(ours, theirs, rtol=1e-6) and ours.dtype == theirs.dtype
    assert deepspeed_patched.get_grad_norm_direct is patches.get_grad_norm_direct
