"""Training-step throughput of the model library: samples/s and achieved FLOP/s per size.

    python benchmarks/model_step.py [--sizes tiny,small,base] [--device cpu|cuda] [--steps 5]

A step is the full multi-task objective (every loss of LossWeights), backward and AdamW on
synthetic data. FLOPs per sample are counted by torch.utils.flop_counter on one step. The
ratio printed is achieved FLOP/s over a baseline measured in the same process: a plain
square matmul in the same dtype on the same device (the ceiling dense work reaches here).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import model_config
from model.flops import training_flops
from model.multimodal import CrossModalModel, parameter_counts
from model.objectives import MultiTaskObjective
from model.synthetic import synthetic_batch as model_synthetic_batch

DEFAULT_BATCH = {"cpu": {"tiny": 32, "small": 16, "base": 2}, "cuda": {"tiny": 256, "small": 256, "base": 128}}


def synthetic_batch(cfg, batch: int, device) -> dict:
    return model_synthetic_batch(cfg, batch, text_len=cfg.max_text_len // 2, question_len=8, device=device)


def matmul_flops_per_s(device, dtype, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    repeats = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_size(size: str, batch: int, steps: int, device, dtype) -> dict:
    cfg = model_config(size)
    model = CrossModalModel(cfg).to(device).train()
    objective = MultiTaskObjective()
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **fused)
    data = synthetic_batch(cfg, batch, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            loss, _ = objective(model, data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (allocations, kernels)
    flops = training_flops(step, batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "size": size,
        "params": parameter_counts(model)["total"],
        "batch": batch,
        "step_s": seconds,
        "samples_s": batch / seconds,
        "gflop_sample": flops / 1e9,
        "tflops": flops * batch / seconds / 1e12,
        "memory_gib": memory,
    }


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small,base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="one batch size for every size")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    baseline = matmul_flops_per_s(device, dtype, 8192 if device.type == "cuda" else 1024) / 1e12
    print(
        f"device {device} ({device_name(device)}), dtype {dtype}, baseline: plain {dtype} matmul {baseline:.3f} TFLOP/s"
    )
    print(
        f"{'size':6} {'params':>12} {'batch':>5} {'step s':>8} {'samples/s':>10} {'GFLOP/sample':>13} "
        f"{'TFLOP/s':>9} {'vs matmul':>9} {'mem GiB':>8}"
    )
    for size in args.sizes.split(","):
        batch = args.batch or DEFAULT_BATCH[device.type][size]
        r = bench_size(size, batch, args.steps, device, dtype)
        line = (
            f"{r['size']:6} {r['params']:>12,} {r['batch']:>5} {r['step_s']:>8.3f} {r['samples_s']:>10.1f} "
            f"{r['gflop_sample']:>13.2f} {r['tflops']:>9.4f} {r['tflops'] / baseline:>9.3f} {r['memory_gib']:>8.2f}"
        )
        print(line, flush=True)


if __name__ == "__main__":
    main()
