"""DeepSpeed set-up for the training loop: config, model wrapper, schedule, checkpoints.

DeepSpeed is imported with this project's patches (`pipelines.patches`: no JIT build of an
op used only for inference, clipping without a device sync) and without torch's
per-collective deprecation warnings.
"""

from __future__ import annotations

import math
import os
import pickle
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from model.objectives import MultiTaskObjective
from pipelines.config.train import LoopConfig
from pipelines.patches import patch_deepspeed

# The dtype a batch is cast to: the engine's weights' (bf16-mixed keeps fp32 weights under autocast).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "bf16-mixed": torch.float32}


def import_deepspeed():
    """deepspeed, on the accelerator this machine has, with this project's patches applied."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    warnings.filterwarnings(
        "ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*", category=FutureWarning
    )
    import deepspeed

    patch_deepspeed()
    return deepspeed


def bf16_is_faster(device: torch.device, size: int = 256) -> bool:
    """Whether a bf16 matmul beats an fp32 one on this device. On a CPU without native bf16
    (no AVX512-BF16 or AMX) bf16 is emulated: 1.2 against 76 GFLOP/s measured on one 2-core
    machine, a `small` ZeRO-2 step 15.3 s against 1.56 s."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        timings[dtype] = time.perf_counter() - started
    return timings[torch.bfloat16] < timings[torch.float32]


def resolve_precision(cfg: LoopConfig, device: torch.device, agree=None) -> LoopConfig:
    """`precision: auto` made concrete on the machine that trains: bf16 where it is faster than
    fp32, else fp32. `agree(flag) -> bool` makes every rank take the same choice (all say yes)."""
    if cfg.precision != "auto":
        return cfg
    faster = bf16_is_faster(device)
    if agree is not None:
        faster = agree(faster)
    return cfg.model_copy(update={"precision": "bf16" if faster else "fp32"})


def deepspeed_config(cfg: LoopConfig, world_size: int) -> dict:
    """DeepSpeed's config from ours, with the settings that keep its step free of device syncs:
    a sync stops the host from queueing the next step's work while the GPU finishes this one,
    and a multi-tower model's step is bound by the host at batch sizes that fit (see README,
    "GPU")."""
    zero = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        # overlap_comm reduces on a side stream, but synchronizes the device to do it.
        zero |= {
            "overlap_comm": False,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e7,
            "allgather_bucket_size": 5e7,
        }
    if cfg.offload_optimizer and cfg.zero_stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "zero_optimization": zero,
        # bf16 has fp32's range: no loss scale, and no per-step overflow check (a device sync).
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 12},
        "gradient_clipping": cfg.clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # On by default, and it synchronizes the device before every forward: we time steps ourselves.
        "timers": {"throughput": {"enabled": False}},
    }
    if cfg.precision == "bf16-mixed":  # fp32 weights and gradients, bf16 compute: torch.autocast inside the engine
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return merge(config, cfg.deepspeed)


def merge(base: dict, overrides: dict) -> dict:
    """`overrides` laid over `base`, nested dicts merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class ObjectiveModule(nn.Module):
    """The model and its multi-task objective as one module: DeepSpeed calls forward(batch) -> loss.

    Computing the loss inside forward matters under ZeRO-3: parameters are gathered by module
    hooks, so everything (the temperature included) must be used inside a module call."""

    def __init__(self, model: nn.Module, objective, every_parameter: bool = True):
        super().__init__()
        # An objective that is an nn.Module (distillation's projections) trains with the model.
        self.model, self.objective, self.every_parameter = model, objective, every_parameter

    def forward(self, batch: dict, generator: torch.Generator | None = None):
        loss, parts = self.objective(self.model, batch, generator)
        if self.every_parameter:
            # Every trainable parameter in the graph, at zero weight. A micro-batch without an
            # image (or a question, ...) leaves that tower's (or head's) parameters without a
            # gradient on that rank only; ZeRO-1/2 then reduce different buckets on different
            # ranks and gloo aborts (seen on a dozen-sample data set with micro-batches of 2).
            loss = loss + 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)
        return loss, parts


class Budget:
    """How much of the time budget (max_minutes) is spent, agreed by all ranks each step."""

    fraction: float = 0.0


def warmup_cosine(cfg: LoopConfig, budget: Budget | None = None):
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


def aligned_first(params: list) -> list:
    """Parameters whose size is a multiple of 8 elements first, the others (odd-length biases,
    scalars) after them. DeepSpeed flattens each group into one buffer in this order and the
    model then computes on views into it; a view that does not start on a 16-byte boundary
    sends cuBLAS to slow kernels (addmm 7x slower on an H100 with bf16 weights, measured)."""
    return sorted(params, key=lambda p: p.numel() % 8 != 0)


def initialize(model: nn.Module, cfg: LoopConfig, world_size: int, budget: Budget | None = None, objective=None):
    """(engine, ds_config) with a client AdamW and a warm-up + cosine scheduler. `objective`:
    the multi-task objective of `cfg.losses` by default (the model's own modality dropout)."""
    deepspeed = import_deepspeed()
    objective = objective if objective is not None else MultiTaskObjective(cfg.losses.weights())
    # ZeRO-3 keeps parameters partitioned outside their module's forward: no zero-weight term there.
    module = ObjectiveModule(model, objective, every_parameter=cfg.zero_stage < 3)
    # Trainable parameters only: frozen ones (all but the adapters under LoRA) get no optimizer
    # state, no fp32 master copy and no weight decay.
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    decay = aligned_first([p for n, p in trainable if p.ndim >= 2 and "pos" not in n.split(".")[-1]])
    no_decay = aligned_first([p for n, p in trainable if not (p.ndim >= 2 and "pos" not in n.split(".")[-1])])
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        [group for group in groups if group["params"]],  # LoRA's adapters are all matrices: no no-decay group
        lr=cfg.lr,
        betas=(0.9, 0.98),
        fused=os.environ["DS_ACCELERATOR"] == "cuda",
    )  # one kernel for every parameter
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg, budget))
    ds_config = deepspeed_config(cfg, world_size)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, ds_config


def cast_batch(batch: dict, dtype: torch.dtype) -> dict:
    """Floating inputs in the engine's dtype (a bf16 engine holds bf16 weights)."""
    return {k: v.to(dtype) if v.is_floating_point() and k != "weight" else v for k, v in batch.items()}


def save_rng(folder: Path, rank: int, generator: torch.Generator | None = None) -> None:
    """This rank's random state: the global generators and the objective's own `generator`
    (masks, negatives, modality dropout), so a resumed run draws what an unbroken one would."""
    import random

    import numpy as np

    # Tensors, ints and tuples only: load_rng reads it back with weights_only=True (no pickle).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if generator is not None:
        state["objective"] = generator.get_state()
    torch.save(state, folder / f"rng-rank{rank}.pt")


def load_rng(folder: Path, rank: int, generator: torch.Generator | None = None) -> bool:
    """Restore what save_rng wrote; False when the checkpoint holds no state for the objective's
    generator (written before it was saved, or by another world size): the caller reseeds it."""
    import random

    import numpy as np

    path = folder / f"rng-rank{rank}.pt"
    if not path.exists():
        return False
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError:  # written by an older version as a full pickle: never loaded
        print(f"{path.name}: not a plain-tensor RNG state, not loaded; the random streams start afresh")
        return False
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    if generator is None or "objective" not in state:
        return False
    generator.set_state(state["objective"])
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
    # Only the model: an objective's own parameters (distillation's projections) stay behind.
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
