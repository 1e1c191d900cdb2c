"""Every change this project makes to a library's own behaviour, each guarded by the library
versions it was written and tested for.

On a version outside that range a patch is not applied: the library keeps its own behaviour
and a warning says what is lost (a slower step, a busier core), never a silent no-op. Each
patch's test runs it against the real library object it replaces (tests/pipelines/test_patches.py).

- DeepSpeed `build_shm_op`: the shared-memory all-reduce op DeepSpeed JIT-compiles on its first
  `init_distributed` (20-26 s a worker start on CPU, used only for inference): skipped.
- DeepSpeed ZeRO-1/2 `unscale_and_clip_grads`: the same clipping rule without its device sync
  (it asks the host whether the norm is finite every step, which stalls a GPU step).
- DeepSpeed `mask_nan_or_inf_with_val_inplace` (the gradient norm's invalid marker, once per
  parameter group and step): the same -1 fill from a Python float; DeepSpeed's builds the value
  on the host and copies it to the device, then fills with a device tensor the kernel reads back
  (two syncs per group, four per ZeRO-2 step of our model: 14 syncs against AMP's 10 on an H200).
- DeepSpeed ZeRO-1/2 `get_grad_norm_direct`: the same 2-norm as one foreach norm over the
  gradients, not a cast and a norm per gradient (2,300 of a `tiny` ZeRO-2 step's 12,700 aten
  calls, against a handful for AMP's `clip_grad_norm_`; on a GPU each call is a launch).
- Ray Data's streaming executor spins while back-pressured; `IdleBackoff` (an execution
  callback that reads the executor's private `_topology`) sleeps after a step in which nothing
  moved.
- nlpaug imports `transformers` (5-9 s on a 2-core machine, in every Ray Data worker process)
  for model-based augmenters this project never builds: `import_nlpaug` imports it with
  `transformers` hidden for the duration.
- Ray Train's PlacementGroupCleaner: its monitor thread dies with a bare RpcError traceback
  when the GCS answers slowly (a busy 2-core machine); every Ray worker process (through
  `worker_setup`, Ray's worker_process_setup_hook) says so on one line instead.
- Ray Train's run snapshot (the registered checkpoints a restart resumes from) is written in
  place; a disk that filled during that write left it empty and the run could never resume.
  `write_snapshot_atomically` writes a temporary file and renames it (set up by `worker_setup`
  in every worker process, the training controller's included).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
import time
import warnings
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet

try:  # private in Ray 2.60; absent where the standalone trainer runs without Ray
    from ray.data._internal.execution.execution_callback import ExecutionCallback
except ImportError:
    ExecutionCallback = None

DEEPSPEED_VERSIONS = SpecifierSet(">=0.19.8,<0.20")
RAY_VERSIONS = SpecifierSet(">=2.60,<2.61")
NLPAUG_VERSIONS = SpecifierSet(">=1.1.11,<1.2")
IDLE_SLEEP_S = 0.05
# The library's own objects each patch replaced, by dotted name (the tests compare against them).
REPLACED: dict[str, object] = {}


class PatchSkipped(UserWarning):
    """A library version the patch was not written for: its own behaviour is kept."""


def supported(library: str, versions: SpecifierSet, what: str) -> bool:
    """Whether the installed `library` is one `versions` admits; warns (once per call site) if not."""
    try:
        installed = version(library)
    except PackageNotFoundError:
        return False
    if installed in versions:
        return True
    warnings.warn(
        f"{library} {installed} is not {versions}, which this project's patch was written for: {what}",
        PatchSkipped,
        stacklevel=3,
    )
    return False


# -- DeepSpeed ----------------------------------------------------------------------------------
def patch_deepspeed() -> bool:
    """Apply the DeepSpeed patches (idempotent); False when the version is not one they fit."""
    if not supported(
        "deepspeed",
        DEEPSPEED_VERSIONS,
        "DeepSpeed's shm op is JIT-built on the first init (20-26 s) and ZeRO-1/2 clipping syncs the device every step",
    ):
        return False
    import deepspeed.comm.torch  # noqa: F401 - the module object comes from sys.modules: the name shadows torch
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    comm = sys.modules["deepspeed.comm.torch"]
    REPLACED.setdefault("deepspeed.comm.torch.build_shm_op", comm.build_shm_op)
    REPLACED.setdefault("DeepSpeedZeroOptimizer.unscale_and_clip_grads", DeepSpeedZeroOptimizer.unscale_and_clip_grads)
    comm.build_shm_op = skip_shm_op
    DeepSpeedZeroOptimizer.unscale_and_clip_grads = unscale_and_clip_grads
    REPLACED.setdefault("DeepSpeedZeroOptimizer.get_grad_norm_direct", DeepSpeedZeroOptimizer.get_grad_norm_direct)
    DeepSpeedZeroOptimizer.get_grad_norm_direct = get_grad_norm_direct
    # Each module imported the function by name: the name is replaced where it is looked up.
    for name in NORM_MASK_USERS:
        module = importlib.import_module(name)
        REPLACED.setdefault(f"{name}.mask_nan_or_inf_with_val_inplace", module.mask_nan_or_inf_with_val_inplace)
        module.mask_nan_or_inf_with_val_inplace = mask_nan_or_inf_with_val_inplace
    return True


NORM_MASK_USERS = ("deepspeed.runtime.utils", "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3")


def mask_nan_or_inf_with_val_inplace(input, device=None, val=-1.0):  # DeepSpeed's signature
    """In place of DeepSpeed's: a NaN or infinite gradient norm becomes -1 (its invalid marker;
    like DeepSpeed's, whatever `val` says), filled from a Python float: nothing read back."""
    input.masked_fill_(input.isnan() | input.isinf(), -1.0)


def get_grad_norm_direct(self, gradients, params, norm_type=2):
    """DeepSpeed ZeRO-1/2's gradient norm over this rank's partition (the same gradients, the
    same float32 sums, the same reductions across ranks), with one foreach norm for all of
    them. The infinity norm keeps DeepSpeed's own code."""
    import torch

    stage = sys.modules["deepspeed.runtime.zero.stage_1_and_2"]
    norm_type = float(norm_type)
    if norm_type == float("inf"):
        return REPLACED["DeepSpeedZeroOptimizer.get_grad_norm_direct"](self, gradients, params, norm_type)
    unpadded = (g for g in gradients if not getattr(g, "_zero_padding", False))
    counted = [
        g.data
        for g, p in zip(unpadded, params)
        if not (hasattr(p, stage.PIPE_REPLICATED) and p.ds_pipe_replicated)  # replicated: counted once
        and (stage.is_model_parallel_parameter(p) or self.model_parallel_rank == 0)
    ]
    if counted:
        norms = torch._foreach_norm(counted, norm_type, dtype=stage.get_norm_dtype())
        total_norm = torch.stack(norms).pow(norm_type).sum().float()
    else:
        total_norm = torch.zeros((), dtype=torch.float32, device=self.device)
    stage.dist.all_reduce(total_norm, op=stage.dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total_norm, op=stage.dist.ReduceOp.SUM)
    total_norm = total_norm.pow(1.0 / norm_type)
    mask_nan_or_inf_with_val_inplace(total_norm, device=self.device)
    return total_norm


def skip_shm_op():
    """In place of `deepspeed.comm.torch.build_shm_op`: no op, so no JIT build."""
    return None


def unscale_and_clip_grads(self, grad_groups_flat, total_norm):
    """DeepSpeed ZeRO-1/2's clip, without its device sync (`bool(tensor)` on the norm every step).
    The same rule as tensor arithmetic: a non-finite or negative (invalid) norm clips to zero."""
    import torch

    if self.clip_grad == 0.0 and self.loss_scale == 1.0:
        return
    combined_scale = self.loss_scale
    if self.clip_grad > 0.0:
        total_norm = torch.as_tensor(total_norm, dtype=torch.float32)
        valid = torch.isfinite(total_norm) & (total_norm >= 0)
        clip_norm = torch.where(valid, total_norm, torch.full_like(total_norm, float("inf")))
        combined_scale = torch.clamp(((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0) * self.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / combined_scale)


# -- Ray Data -----------------------------------------------------------------------------------
class IdleBackoff(ExecutionCallback or object):
    """Sleeps IDLE_SLEEP_S after a scheduling step in which nothing moved (no task submitted or
    finished, no output taken). Ray Data 2.60's loop blocks in `ray.wait(timeout=0.1)` only
    until its running tasks are done; when the consumer (a train worker) is the slower side,
    finished outputs wait behind back-pressure, `ray.wait` returns at once and the loop spins:
    the SplitCoordinator feeding Ray Train took 45-95% of a core of a 2-core machine. A block
    the consumer asks for is still served at once (another thread reads the output queue);
    only the dispatch of new work waits."""

    def __init__(self):
        self.last = None
        self.blind = False

    def on_execution_step(self, executor) -> None:
        if self.blind:
            return
        try:
            now = tuple(
                (m.num_tasks_submitted, m.num_tasks_finished, m.num_outputs_taken)
                for m in (op.metrics for op in executor._topology)
            )
        except AttributeError as err:  # the version check passed, yet the executor changed shape
            self.blind = True
            warnings.warn(
                f"Ray Data's executor no longer exposes its operators' progress ({err}): the idle "
                "back-off is off and the executor may spin while back-pressured",
                PatchSkipped,
                stacklevel=2,
            )
            return
        if now == self.last:
            time.sleep(IDLE_SLEEP_S)
        self.last = now


def install_idle_backoff(ctx) -> bool:
    """Register IdleBackoff on a Ray DataContext (it travels with datasets built under it)."""
    lost = "the idle back-off is off; Ray Data's executor may spin while back-pressured"
    if not supported("ray", RAY_VERSIONS, lost):
        return False
    if ExecutionCallback is None:
        warnings.warn(
            f"Ray Data's ExecutionCallback is not where Ray 2.60 keeps it: {lost}", PatchSkipped, stacklevel=2
        )
        return False
    if IdleBackoff not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(IdleBackoff)
    return True


# -- Ray worker processes -------------------------------------------------------------------
QUIET_THREADS = {"PlacementGroupCleanerMonitor": "Ray Train's placement-group cleaner stopped monitoring"}


def worker_setup() -> None:
    """Ray's worker_process_setup_hook (set by pipelines.runner.connect_ray): runs first in
    every worker process of the cluster the pipeline starts or joins."""
    from pipelines import env

    env.worker_defaults()
    if not supported("ray", RAY_VERSIONS, "Ray Train's cleaner thread may print a bare RpcError traceback"):
        return
    patch_ray_train()  # the controller, which writes the run snapshot, runs in a worker process
    previous = threading.excepthook

    def excepthook(args) -> None:
        what = QUIET_THREADS.get(getattr(args.thread, "name", ""))
        if what is None:
            previous(args)
            return
        # The cleaner only removes a dead controller's placement group; training goes on.
        first = str(args.exc_value).strip().splitlines()
        logging.getLogger("crossmodal").warning(
            "%s (%s: %s); training goes on", what, args.exc_type.__name__, first[0] if first else ""
        )

    threading.excepthook = excepthook


# -- Ray Train ------------------------------------------------------------------------------------
RAY_SNAPSHOT_WRITE = (
    "ray.train.v2._internal.execution.checkpoint.checkpoint_manager.CheckpointManager._write_state_to_storage"
)


def write_snapshot_atomically(self) -> None:
    """CheckpointManager._write_state_to_storage, published by a rename. Ray truncates its run
    snapshot (the list of registered checkpoints a restart resumes from) and writes it in place:
    a disk that filled at that moment left it empty, and no later run could resume
    ('CheckpointManagerInitializationError: Expecting value', seen in the disk-full drill). Now
    a failed write leaves the previous snapshot as it was, and removes its own partial file."""
    snapshot = self._save_state().encode("utf-8")
    fs = self._storage_context.storage_filesystem
    path = self._storage_context.checkpoint_manager_snapshot_path
    partial = f"{path}.partial"
    try:
        with fs.open_output_stream(partial) as out:
            out.write(snapshot)
        fs.move(partial, path)  # a rename on a local or mounted filesystem
    except OSError:
        with contextlib.suppress(OSError):
            fs.delete_file(partial)
        raise


def patch_ray_train() -> bool:
    """Apply the Ray Train patch (idempotent); False when the version is not one it fits."""
    if not supported("ray", RAY_VERSIONS, "Ray Train writes its run snapshot in place: a full disk can empty it"):
        return False
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager

    if CheckpointManager._write_state_to_storage is not write_snapshot_atomically:
        REPLACED[RAY_SNAPSHOT_WRITE] = CheckpointManager._write_state_to_storage
        CheckpointManager._write_state_to_storage = write_snapshot_atomically
    return True


# -- nlpaug ---------------------------------------------------------------------------------------
def import_nlpaug(module: str):
    """`module` of nlpaug (e.g. "nlpaug.augmenter.word"), imported without `transformers`: its
    language-model modules try `from transformers import ...` at import time and go without it
    on ImportError; the rule-based augmenters used here never need it. `transformers` imports
    as usual afterwards (peft needs it)."""
    import importlib

    if "transformers" in sys.modules or not supported(
        "nlpaug", NLPAUG_VERSIONS, "importing it also imports transformers (5-9 s per worker process)"
    ):
        return importlib.import_module(module)
    sys.modules["transformers"] = None  # an import of it raises ImportError while this is in place
    try:
        return importlib.import_module(module)
    finally:
        del sys.modules["transformers"]
