"""Step time of the `small` model on 2 CPU workers: plain PyTorch DDP against DeepSpeed ZeRO-1, 2, 3.

    python benchmarks/zero_overhead.py [--steps 8] [--batch 16] [--precision fp32|bf16]

All in the same run, with the same model, synthetic batch, objective, AdamW and gloo process
group (2 processes, one thread each). Prints the median step time of each and its ratio to
DDP. Target: ZeRO-2 within 1.15x of DDP.

On a GPU machine (no Ray needed): --gpu runs one process on the first GPU, `base` size: a plain
PyTorch AMP step (bf16 autocast, fused AdamW, clipping) against DeepSpeed engines in each of
--precisions (bf16: bf16 weights; bf16-mixed: fp32 weights under autocast) and --gpu-stages,
with samples/s and achieved TFLOP/s. With --spec (a prepare stage's dataset_spec.json), the
model is the one that data fits (`base` size at the spec's image size, audio length and
vocabulary) and the standalone training loop (pipelines/training/standalone.py: DataLoader
workers decoding the shards, DeepSpeed ZeRO-2 bf16, checkpoint and consolidation at the end)
trains it for --loop-steps after the synthetic runs: its samples/s is the median of the loop's
own logged windows after the first.
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


def ddp_step_fn(model_cfg, batch_size, precision, device, ddp: bool = True):
    """Plain PyTorch: autocast in `precision`, AdamW (fused on GPU), clipping; under DDP unless
    `ddp` is False (the one-GPU AMP baseline: no wrapper at all)."""
    from torch.nn.parallel import DistributedDataParallel

    from model.multimodal import CrossModalModel
    from model.objectives import MultiTaskObjective
    from pipelines.training.engine import ObjectiveModule

    torch.manual_seed(0)
    module = ObjectiveModule(CrossModalModel(model_cfg).to(device), MultiTaskObjective(modality_dropout=0.0))
    net = DistributedDataParallel(module) if ddp else module
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


def zero_step_fn(model_cfg, batch_size, precision, stage, world):
    from model.multimodal import CrossModalModel
    from pipelines.config.train import TrainConfig
    from pipelines.training.engine import DTYPES, cast_batch, initialize

    cfg = TrainConfig(zero_stage=stage, precision=precision, micro_batch=batch_size, model={"modality_dropout": 0.0})
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


def busy(step, seconds: float, device) -> None:
    """GPU kernel time per step (two profiled steps) against the unprofiled step time: well
    under 1, the host (Python, kernel launches, device syncs) is what a step waits on."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize(device)
    events = prof.key_averages()
    kernel = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 2e6
    syncs = sum(e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize")) / 2
    print(
        f"{'':16} GPU kernels {kernel * 1000:.1f} ms per step (busy {kernel / seconds:.2f} of the step), "
        f"{syncs:.0f} device syncs per step",
        flush=True,
    )


def loop_train_config(batch: int, steps: int):
    """The standalone loop's settings: the synthetic runs' model, objective and engine, no validation
    or checkpoint before the end."""
    from pipelines.config.train import TrainConfig

    return TrainConfig(
        model={"size": "base", "image_encoder": "vit", "modality_dropout": 0.0},
        zero_stage=2,
        precision="bf16",
        micro_batch=batch,
        max_steps=steps,
        warmup_steps=min(10, steps),
        log_every=10,
        val_every=steps,
        checkpoint_every=steps,
        stream_epochs=1000,
    )


def loop_samples_per_s(train_cfg, spec, loader_workers: int) -> float:
    import tempfile

    from pipelines.training.standalone import print_metrics, run

    windows = []

    def log(metrics: dict, step: int) -> None:
        print_metrics(metrics, step)
        if "samples_per_s" in metrics:
            windows.append(metrics["samples_per_s"])

    with tempfile.TemporaryDirectory() as out:
        run(train_cfg, spec, Path(out), loader_workers, log)
    return statistics.median(windows[1:] or windows)


def gpu_benchmark(args) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    from model.config import model_config
    from model.flops import training_flops
    from model.tokenizer import Tokenizer
    from pipelines.config.train import model_config_for
    from pipelines.training.engine import import_deepspeed
    from pipelines.training.standalone import read_spec

    import_deepspeed().init_distributed(dist_backend="nccl")
    device = torch.device("cuda")
    cfg = model_config("base")
    if args.spec:
        spec = read_spec(Path(args.spec))
        train_cfg = loop_train_config(args.batch, args.loop_steps)
        cfg = model_config_for(train_cfg, spec, Tokenizer.from_json(spec.tokenizer_json))
    results = {}
    runs = [("amp", lambda: ddp_step_fn(cfg, args.batch, "bf16", device, ddp=False))]
    runs += [
        (f"zero{s} {p}", lambda s=s, p=p: zero_step_fn(cfg, args.batch, p, s, 1))
        for s in args.gpu_stages
        for p in args.precisions
    ]
    flops = None
    for name, build in runs:
        step = build()
        timed(step, args.warmup, device)
        flops = flops or training_flops(step, args.batch)  # the same model and batch in every run
        torch.cuda.reset_peak_memory_stats()
        seconds = statistics.median(timed(step, args.steps, device))
        results[name] = (
            seconds,
            args.batch / seconds,
            flops * args.batch / seconds / 1e12,
            torch.cuda.max_memory_allocated() / 2**30,
        )
        print(
            f"{name:16} step {seconds * 1000:7.1f} ms  {args.batch / seconds:7.1f} samples/s  "
            f"{results[name][2]:6.1f} TFLOP/s  "
            f"peak {results[name][3]:5.1f} GiB  ratio to AMP {seconds / results['amp'][0]:.2f}",
            flush=True,
        )
        if args.profile:
            busy(step, seconds, device)
        del step
        torch.cuda.empty_cache()
    if args.spec:
        rate = loop_samples_per_s(train_cfg, spec, args.loader_workers)
        seconds = args.batch / rate
        print(
            f"{'standalone loop':16} step {seconds * 1000:7.1f} ms  {rate:7.1f} samples/s  "
            f"{flops * rate / 1e12:6.1f} TFLOP/s  "
            f"ratio to AMP {seconds / results['amp'][0]:.2f}  (real shards, {args.loader_workers} loader workers; "
            f"TFLOP/s at the synthetic batch's FLOPs per sample)",
            flush=True,
        )
    print(
        f"base model, batch {args.batch}, {torch.cuda.get_device_name()}, {flops / 1e9:.0f} GFLOP per sample, "
        f"median of {args.steps} steps after {args.warmup} warm-up; target: ZeRO-2 <= 1.10x AMP"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument(
        "--precisions",
        type=lambda v: v.split(","),
        default=["bf16", "bf16-mixed"],
        help="--gpu: DeepSpeed precisions to time against AMP",
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--port", type=int, default=29531)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument(
        "--profile", action="store_true", help="--gpu: also print kernel time against wall time per run"
    )
    parser.add_argument(
        "--gpu-stages",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[2],
        help="ZeRO stages to time against AMP on the GPU, e.g. 0,1,2",
    )
    parser.add_argument(
        "--spec", help="--gpu: a prepare stage's dataset_spec.json; also time the standalone loop on it"
    )
    parser.add_argument("--loop-steps", type=int, default=60, help="--spec: optimizer steps of the standalone loop")
    parser.add_argument(
        "--loader-workers", type=int, default=8, help="--spec: DataLoader workers of the standalone loop"
    )
    args = parser.parse_args()
    from pipelines import env

    env.configure()  # as every entry point: e.g. no albumentations update check from loader workers
    gpu_benchmark(args) if args.gpu else cpu_benchmark(args)


if __name__ == "__main__":
    main()
