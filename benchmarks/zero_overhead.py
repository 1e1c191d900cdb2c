"""Step time of the `small` model on 2 CPU workers: plain PyTorch DDP against DeepSpeed ZeRO-1, 2, 3.

    python benchmarks/zero_overhead.py [--steps 8] [--batch 16] [--precision fp32|bf16]

All in the same run, with the same model, synthetic batch, objective, AdamW and gloo process
group (2 processes, one thread each). Prints the median step time of each and its ratio to
DDP. Target: ZeRO-2 within 1.15x of DDP.

The same steps on one GPU, against anchors measured in the same run: benchmarks/gpu_step.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synthetic(cfg, batch, device):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from model_step import synthetic_batch  # the same batch model_step.py times

    return synthetic_batch(cfg, batch, device)


def timed(step, steps: int, device) -> list[float]:
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def ddp_step_fn(model_cfg, batch_size, precision, device, ddp: bool = True, compile_mode: str | None = None):
    """Plain PyTorch: autocast in `precision`, AdamW (fused on GPU), clipping; under DDP unless
    `ddp` is False (the one-GPU AMP baseline: no wrapper at all); with `compile_mode`, the model
    and its objective under torch.compile in that mode."""
    from torch.nn.parallel import DistributedDataParallel

    from model.multimodal import CrossModalModel
    from model.objectives import MultiTaskObjective
    from pipelines.training.engine import ObjectiveModule

    torch.manual_seed(0)
    module = ObjectiveModule(CrossModalModel(model_cfg).to(device), MultiTaskObjective(modality_dropout=0.0))
    net = DistributedDataParallel(module) if ddp else module
    if compile_mode:
        net = torch.compile(net, mode=compile_mode)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    data = synthetic(model_cfg, batch_size, device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = net(data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()

    return step


def zero_step_fn(model_cfg, batch_size, precision, stage, world, deepspeed: dict | None = None):
    """A DeepSpeed engine's step as the training loop builds it; `deepspeed` is laid over the
    generated config (train.deepspeed)."""
    from model.multimodal import CrossModalModel
    from pipelines.config.train import TrainConfig
    from pipelines.training.engine import DTYPES, cast_batch, initialize

    cfg = TrainConfig(
        zero_stage=stage,
        precision=precision,
        micro_batch=batch_size,
        model={"modality_dropout": 0.0},
        deepspeed=deepspeed or {},
    )
    torch.manual_seed(0)
    engine, _ = initialize(CrossModalModel(model_cfg), cfg, world)
    data = cast_batch(synthetic(model_cfg, batch_size, engine.device), DTYPES[precision])

    def step():
        loss, _ = engine(data)
        engine.backward(loss)
        engine.step()

    return step


def worker(rank: int, world: int, args, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(args.port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from model.config import model_config
    from pipelines.training.engine import import_deepspeed

    import_deepspeed().init_distributed(dist_backend="gloo")
    cfg = model_config(args.size)
    runs = [("ddp", lambda: ddp_step_fn(cfg, args.batch, args.precision, torch.device("cpu")))]
    runs += [(f"zero{s}", lambda s=s: zero_step_fn(cfg, args.batch, args.precision, s, world)) for s in (1, 2, 3)]
    for name, build in runs:
        step = build()
        timed(step, args.warmup, torch.device("cpu"))
        times = timed(step, args.steps, torch.device("cpu"))
        dist.barrier()
        if rank == 0:
            results[name] = statistics.median(times)


def cpu_benchmark(args) -> None:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(2, args, results), nprocs=2, join=True)
    ddp = results["ddp"]
    print(
        f"{args.size} model, 2 CPU workers (gloo, 1 thread each), micro-batch {args.batch}/worker, {args.precision}, "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    for name in ("ddp", "zero1", "zero2", "zero3"):
        print(f"{name:6} step {results[name] * 1000:8.1f} ms   ratio to DDP {results[name] / ddp:5.2f}")
    print(f"ZeRO-2 / DDP = {results['zero2'] / ddp:.2f} (target <= 1.15)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--port", type=int, default=29531)
    args = parser.parse_args()
    from pipelines import env

    env.configure()  # as every entry point: e.g. no albumentations update check from loader workers
    cpu_benchmark(args)


if __name__ == "__main__":
    main()
