"""DeepSpeed set-up for the training loop: config, model wrapper, schedule, checkpoints.

Fixed costs removed on CPU: the shared-memory all-reduce op DeepSpeed JIT-compiles on its
first init_distributed (20-26 s, used only for inference), and torch's per-collective
deprecation warnings.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from model.objectives import MultiTaskObjective
from pipelines.training.config import TrainConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def import_deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*", category=FutureWarning)
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (module object via sys.modules: the name shadows torch)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    zero = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero |= {"overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7}
    if cfg.offload_optimizer and cfg.zero_stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 12},
        "gradient_clipping": cfg.clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class ObjectiveModule(nn.Module):
    """The model and its multi-task objective as one module: DeepSpeed calls forward(batch) -> loss.

    Computing the loss inside forward matters under ZeRO-3: parameters are gathered by module
    hooks, so everything (the temperature included) must be used inside a module call."""

    def __init__(self, model: nn.Module, objective: MultiTaskObjective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict, generator: torch.Generator | None = None):
        return self.objective(self.model, batch, generator)


class Budget:
    """How much of the time budget (max_minutes) is spent, agreed by all ranks each step."""

    fraction: float = 0.0


def warmup_cosine(cfg: TrainConfig, budget: Budget | None = None):
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak at max_steps, or when the
    time budget runs out if that comes first (so a run cut by max_minutes still ends annealed)."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        if budget is not None:
            progress = max(progress, min(1.0, budget.fraction))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def initialize(model: nn.Module, cfg: TrainConfig, world_size: int, budget: Budget | None = None):
    """(engine, ds_config) with a client AdamW and a warm-up + cosine scheduler."""
    deepspeed = import_deepspeed()
    module = ObjectiveModule(model, MultiTaskObjective(cfg.losses.weights(), cfg.model.modality_dropout))
    decay = [p for n, p in module.named_parameters() if p.ndim >= 2 and "pos" not in n.split(".")[-1]]
    no_decay = [p for n, p in module.named_parameters() if not (p.ndim >= 2 and "pos" not in n.split(".")[-1])]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg, budget))
    ds_config = deepspeed_config(cfg, world_size)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, ds_config


def cast_batch(batch: dict, dtype: torch.dtype) -> dict:
    """Floating inputs in the engine's dtype (a bf16 engine holds bf16 weights)."""
    return {k: v.to(dtype) if v.is_floating_point() and k != "weight" else v for k, v in batch.items()}


def save_rng(folder: Path, rank: int) -> None:
    import random

    import numpy as np

    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               folder / f"rng-rank{rank}.pt")


def load_rng(folder: Path, rank: int) -> bool:
    import random

    import numpy as np

    path = folder / f"rng-rank{rank}.pt"
    if not path.exists():
        return False
    state = torch.load(path, weights_only=False)  # our own checkpoint, written by save_rng
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    return True


def consolidate(checkpoint_dir: str | Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """One fp32 state dict of the model (without the ObjectiveModule prefix) from a checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint_dir = Path(checkpoint_dir)
    if zero_stage == 0:
        tag = (checkpoint_dir / "latest").read_text().strip()
        states = torch.load(checkpoint_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = {k: v.float() for k, v in states["module"].items()}
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir))
    return {k.removeprefix("model."): v for k, v in state.items()}
