"""FLOPs per sample of a training step, counted by torch.utils.flop_counter."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def training_flops(step, batch_size: int) -> float:
    """FLOPs per sample of `step()` (forward + backward, whatever it runs)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch_size


def forward_flops(fn, batch_size: int) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / batch_size
