"""Find the operations that make the host wait for the GPU, on any device (a CPU too).

On a GPU the host queues kernels ahead of the device; an operation whose result the host needs
(`.item()`, `bool(tensor)`, `nonzero`, a boolean-mask index, `multinomial`'s input check)
stops it until the device has finished everything queued before. In a step bound by the host
(ours: about a hundred thousand aten calls) each such stop leaves the GPU idle while the host
queues the next part. The same aten operations run on a CPU, so they can be counted and
located here without a GPU:

    with HostSyncs() as syncs:
        loss, _ = objective(model, batch)
        loss.backward()
    print(syncs.count, syncs.sites)
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# aten operations whose result (a value or an output size) the host must read from the device.
SYNCING = {
    aten._local_scalar_dense.default: "a scalar read by the host (.item(), bool(), float(), int())",
    aten.nonzero.default: "nonzero (output size depends on the data)",
    aten.masked_select.default: "masked_select (output size depends on the data)",
    aten._unique2.default: "unique (output size depends on the data)",
    aten.unique_consecutive.default: "unique_consecutive (output size depends on the data)",
    aten.equal.default: "equal (a Python bool)",
}
# multinomial checks its input on the host before sampling (a max/min read back) on a GPU.
SYNCING[aten.multinomial.default] = "multinomial (its input check reads the device)"

_HERE = str(Path(__file__).resolve().parent.parent)  # the project: call sites are reported from it


class HostSyncs(TorchDispatchMode):
    """Counts the syncing operations dispatched inside the block (forward and the autograd
    engine's backward alike: its threads inherit the mode), with the first frame outside torch
    that led to each (`sites`: "file:line reason" -> count), and all aten calls (`calls`)."""

    def __init__(self, device_tensors_only: bool = False):
        """`device_tensors_only`: on a GPU, skip reads of CPU tensors (an optimizer's step count),
        which wait for nothing; on a CPU every candidate counts, as it would sync on a GPU."""
        super().__init__()
        self.device_tensors_only = device_tensors_only
        self.sites: Counter[str] = Counter()
        self.calls = 0  # every aten call dispatched: the host's work
        self.launches = 0  # the calls that are not views (a view launches no kernel on a GPU)

    @property
    def count(self) -> int:
        return sum(self.sites.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        self.launches += not is_view(func)
        reason = SYNCING.get(func)
        if reason is None and func is aten.index.Tensor:  # x[bool_mask] is a nonzero in disguise
            indices = args[1] if len(args) > 1 else ()
            if any(i is not None and i.dtype == torch.bool for i in indices):
                reason = "boolean-mask index (output size depends on the data)"
        if reason is not None and self.device_tensors_only and not on_a_device(args):
            reason = None
        if reason is not None:
            self.sites[f"{call_site()} {reason}"] += 1
        return func(*args, **(kwargs or {}))


def is_view(func) -> bool:
    """An op whose outputs alias its input without writing it (view, transpose, detach, ...)."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def on_a_device(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)


def call_site() -> str:
    """The innermost frame outside torch and this module: who asked for the value."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename
        if "/torch/" in path or path == __file__:
            continue
        shown = path[len(_HERE) + 1 :] if path.startswith(_HERE) else path
        return f"{shown}:{frame.lineno}"
    return "<torch>"
