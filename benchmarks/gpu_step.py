"""The training step on one GPU, against anchors measured in the same run.

    python benchmarks/gpu_step.py [--batch 128] [--precisions bf16] [--spec SPEC] [--loader-workers 8,14]

One process, one device, in this order:
1. the device and its ceiling: a plain bf16 matmul (8192^3 on a GPU);
2. the anchor: open_clip ViT-B/16, plain AMP and fused AdamW (when open_clip imports; without
   it the run says so and prints no comparison: a constant from another machine is no anchor);
3. our model (`base`, or with --spec the `base` model that data fits) with plain AMP (bf16
   autocast, fused AdamW, clipping) on a synthetic batch;
4. DeepSpeed ZeRO-2 in each of --precisions on the same batch;
5. with --spec: data alone (the training loop's own loader, to the device, no step) for each
   --loader-workers, then the standalone training loop on the shards.
Every line gives samples/s, TFLOP/s and MFU (over the matmul ceiling); steps also give the
aten calls and host syncs of one step (model.syncs), and --profile the GPU's busy share.
The run ends with the targets: loop <= 1.10x the AMP step, ZeRO-2 <= 1.10x, AMP TFLOP/s at or
above the anchor's. `--device cpu --size tiny` runs all of it on a CPU (the smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_step import matmul_flops_per_s, sync  # benchmarks/ siblings
from zero_overhead import ddp_step_fn, timed, zero_step_fn

from model.config import model_config

TARGET = 1.10  # the loop and ZeRO-2, each over the AMP step
OPEN_CLIP_VOCAB, OPEN_CLIP_CONTEXT = 49408, 77


class Report:
    """Printed lines with the figures the targets are judged on."""

    def __init__(self, device, ceiling: float):
        self.device, self.ceiling, self.figures = device, ceiling, {}

    def rate(self, name: str, samples_per_s: float, flops_per_sample: float | None, extra: str = "") -> None:
        tflops = flops_per_sample * samples_per_s / 1e12 if flops_per_sample else None
        self.figures[name] = (samples_per_s, tflops)
        shown = f"{tflops:7.1f} TFLOP/s  MFU {tflops / self.ceiling:.2f}" if tflops else f"{'':22}"
        print(f"{name:28} {samples_per_s:8.1f} samples/s  {shown}  {extra}", flush=True)

    def target(self, name: str, over: str, under: str, at_most: float | None = None, at_least: float | None = None):
        if over not in self.figures or under not in self.figures:
            print(f"  {name}: not measured in this run", flush=True)
            return
        # Step time ratios are inverse rate ratios; TFLOP/s ratios are direct.
        if at_most is not None:
            ratio = self.figures[under][0] / self.figures[over][0]
            verdict = "met" if ratio <= at_most else "missed"
            print(f"  {name}: {ratio:.2f}x (target <= {at_most:.2f}x): {verdict}", flush=True)
        else:
            ratio = self.figures[over][1] / self.figures[under][1]
            verdict = "met" if ratio >= at_least else "missed"
            print(f"  {name}: {ratio:.2f} (target >= {at_least:.2f}): {verdict}", flush=True)


def host_work(step, device) -> str:
    """aten calls and host syncs of one step (counted under a dispatch mode: that step is slow)."""
    from model.syncs import HostSyncs

    try:
        with HostSyncs(device_tensors_only=device.type != "cpu") as syncs:
            step()
        sync(device)
    except Exception as err:  # noqa: BLE001  (counting must never cost the run its other figures)
        return f"host work not counted ({type(err).__name__}: {str(err)[:80]})"
    sites = ", ".join(f"{site} x{n}" for site, n in syncs.sites.most_common(4))
    work = f"{syncs.calls:,} aten calls ({syncs.launches:,} not views), {syncs.count} host syncs per step"
    return work + (f" ({sites})" if sites else "")


def busy(step, seconds: float) -> str:
    """GPU kernel time per step (two profiled steps) over the unprofiled step time: well under 1,
    the GPU waits on the host (Python, launches, syncs)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernel = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 2e6
    return f"GPU busy {kernel / seconds:.2f} of the step ({kernel * 1000:.1f} ms of kernels)"


def measure(report: Report, name: str, step, batch: int, args, flops: float | None = None) -> float | None:
    """Times `step` (median of --steps after --warmup) and reports it; returns FLOPs per sample."""
    from model.flops import training_flops

    device = report.device
    timed(step, args.warmup, device)
    flops = flops or training_flops(step, batch)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = statistics.median(timed(step, args.steps, device))
    memory = f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, " if device.type == "cuda" else ""
    extra = f"step {seconds * 1000:.1f} ms, {memory}{host_work(step, device)}"
    if args.profile and device.type == "cuda":
        extra += ", " + busy(step, seconds)
    report.rate(name, batch / seconds, flops, extra)
    return flops


def open_clip_step(batch: int, device):
    """open_clip's ViT-B/16 CLIP step as its training script runs it: AMP, fused AdamW."""
    import open_clip

    model = open_clip.create_model("ViT-B-16", pretrained=None).to(device).train()
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device.type == "cuda" else {}))
    images = torch.randn(batch, 3, 224, 224, device=device)
    text = torch.randint(0, OPEN_CLIP_VOCAB, (batch, OPEN_CLIP_CONTEXT), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            image_features, text_features, scale = model(images, text)[:3]
            loss = loss_fn(image_features, text_features, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def data_alone(spec, batch: int, workers: int, device, batches: int) -> float:
    """samples/s of the training loop's loader to the device, no step: the first batch of each
    worker (process start-up) is not timed."""
    from pipelines.training.standalone import model_batches

    stream = model_batches(spec, "train", 0, 1, 0, batch, True, 1000, workers, device)
    start = None
    for index, _ in enumerate(stream):
        if index == max(workers, 1):
            sync(device)
            start = time.perf_counter()
        if index == max(workers, 1) + batches:
            sync(device)
            break
    return batches * batch / (time.perf_counter() - start)


def loop_train_config(size: str, batch: int, steps: int):
    """The standalone loop's settings: the synthetic runs' model, objective and engine, no
    validation or checkpoint before the end."""
    from pipelines.config.train import TrainConfig

    return TrainConfig(
        model={"size": size, "image_encoder": "vit", "modality_dropout": 0.0},
        zero_stage=2,
        precision="bf16",
        micro_batch=batch,
        max_steps=steps,
        max_minutes=None,
        warmup_steps=min(10, steps),
        log_every=max(1, min(10, steps // 4)),
        val_every=steps,
        checkpoint_every=steps,
        stream_epochs=1000,
    )


def loop_samples_per_s(train_cfg, spec, loader_workers: int) -> float:
    """The median of the loop's own logged windows after the first (which waits for the workers)."""
    from pipelines.training.standalone import run

    windows = []

    def log(metrics: dict, step: int) -> None:
        if "samples_per_s" in metrics:
            windows.append(metrics["samples_per_s"])

    with tempfile.TemporaryDirectory() as out:
        run(train_cfg, spec, Path(out), loader_workers, log)
    return statistics.median(windows[1:] or windows)


def model_for(args):
    """(model config, train config, dataset spec): `--size`, or the `--size` model --spec's data fits."""
    from model.tokenizer import Tokenizer
    from pipelines.config.train import model_config_for
    from pipelines.training.standalone import read_spec

    if not args.spec:
        return model_config(args.size), None, None
    spec = read_spec(Path(args.spec))
    train_cfg = loop_train_config(args.size, args.batch, args.loop_steps)
    return model_config_for(train_cfg, spec, Tokenizer.from_json(spec.tokenizer_json)), train_cfg, spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="base")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--anchor-batch", type=int, default=256, help="open_clip ViT-B/16's batch")
    parser.add_argument("--precisions", type=lambda v: v.split(","), default=["bf16"], help="DeepSpeed ZeRO-2's")
    parser.add_argument(
        "--zero-variant",
        action="append",
        default=[],
        type=json.loads,
        metavar="JSON",
        help='also ZeRO-2 bf16 with this laid over its DeepSpeed config, e.g. {"zero_optimization": {...}}',
    )
    parser.add_argument(
        "--compile",
        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
        help="last in the run: the AMP step with the model and objective under torch.compile in this mode",
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--port", type=int, default=29531)
    parser.add_argument("--profile", action="store_true", help="also the GPU's busy share of each step")
    parser.add_argument("--spec", help="a prepare stage's dataset_spec.json: data alone and the loop on it")
    parser.add_argument("--loop-steps", type=int, default=60, help="--spec: optimizer steps of the loop")
    parser.add_argument(
        "--loader-workers", type=lambda v: [int(x) for x in v.split(",")], default=[8], help="--spec: e.g. 8,14"
    )
    parser.add_argument("--data-batches", type=int, default=40, help="--spec: batches timed for data alone")
    args = parser.parse_args()
    from pipelines import env

    env.configure()  # as every entry point: e.g. no albumentations update check from loader workers
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    from pipelines.training.engine import import_deepspeed

    device = torch.device(args.device)
    import_deepspeed().init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    ceiling = matmul_flops_per_s(device, torch.bfloat16, 8192 if device.type == "cuda" else 1024) / 1e12
    print(f"device: {name}; ceiling: plain bf16 matmul {ceiling:.1f} TFLOP/s (MFU = TFLOP/s over it)", flush=True)
    report = Report(device, ceiling)
    try:
        step = open_clip_step(args.anchor_batch, device)
    except ImportError as err:
        print(f"anchor: open_clip does not import here ({err}); no comparison with it in this run", flush=True)
    else:
        measure(report, "open_clip ViT-B/16 AMP", step, args.anchor_batch, args)
        del step
    try:
        cfg, train_cfg, spec = model_for(args)
    except ImportError as err:  # a GPU machine without the data path's packages: the synthetic runs still go
        print(f"--spec: the data path does not import here ({err}); synthetic runs of `{args.size}` only", flush=True)
        cfg, train_cfg, spec = model_config(args.size), None, None
    step = ddp_step_fn(cfg, args.batch, "bf16", device, ddp=False)
    flops = measure(report, f"{args.size} AMP", step, args.batch, args)
    del step
    for precision in args.precisions:
        step = zero_step_fn(cfg, args.batch, precision, 2, 1)
        measure(report, f"{args.size} ZeRO-2 {precision}", step, args.batch, args, flops)
        del step
    for number, variant in enumerate(args.zero_variant, 1):
        print(f"ZeRO-2 bf16 variant {number}: {json.dumps(variant)}", flush=True)
        step = zero_step_fn(cfg, args.batch, "bf16", 2, 1, variant)
        measure(report, f"{args.size} ZeRO-2 bf16 variant {number}", step, args.batch, args, flops)
        del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if spec is not None:
        runs = [("data alone", lambda w: data_alone(spec, args.batch, w, device, args.data_batches))]
        runs += [("loop", lambda w: loop_samples_per_s(train_cfg, spec, w))]
        for name, rate_of in runs:
            for workers in args.loader_workers:
                try:
                    rate = rate_of(workers)
                except Exception as err:  # noqa: BLE001  (one line, and the figures already measured still print)
                    why = " ".join(str(err).split())[:300]
                    print(f"{name}, {workers} workers: failed ({type(err).__name__}: {why})", flush=True)
                    continue
                what = "loader to the device, no step" if name == "data alone" else "ZeRO-2 bf16 on the shards"
                report.rate(f"{name}, {workers} workers", rate, flops if name == "loop" else None, what)
    print(f"{args.size} model, batch {args.batch}, {flops / 1e9:.1f} GFLOP per sample; targets:", flush=True)
    amp = f"{args.size} AMP"
    loops = [n for n in report.figures if n.startswith("loop, ")]
    best_loop = max(loops, key=lambda n: report.figures[n][0]) if loops else "loop"
    report.target(f"{best_loop} / AMP step", best_loop, amp, at_most=TARGET)
    report.target("ZeRO-2 bf16 / AMP step", f"{args.size} ZeRO-2 bf16", amp, at_most=TARGET)
    for number in range(1, len(args.zero_variant) + 1):
        name = f"ZeRO-2 bf16 variant {number}"
        report.target(f"{name} / AMP step", f"{args.size} {name}", amp, at_most=TARGET)
    report.target("AMP TFLOP/s / open_clip ViT-B/16's", amp, "open_clip ViT-B/16 AMP", at_least=1.0)
    if args.compile:  # last: compiling the three towers takes minutes, and every figure above is printed
        name = f"{amp}, torch.compile {args.compile}"
        started = time.perf_counter()
        step = ddp_step_fn(cfg, args.batch, "bf16", device, ddp=False, compile_mode=args.compile)
        try:
            step()  # the compilation
        except Exception as err:  # noqa: BLE001  (one line; every figure above is already printed)
            why = " ".join(str(err).split())[:300]  # one line
            print(f"torch.compile {args.compile}: failed ({type(err).__name__}: {why})", flush=True)
            return
        print(f"torch.compile {args.compile}: compiled in {time.perf_counter() - started:.0f} s", flush=True)
        measure(report, name, step, args.batch, args, flops)
        if name in report.figures:
            print(f"  {name} / AMP step: {report.figures[amp][0] / report.figures[name][0]:.2f}x", flush=True)
        report.target(f"{name}: TFLOP/s / open_clip ViT-B/16's", name, "open_clip ViT-B/16 AMP", at_least=1.0)


if __name__ == "__main__":
    main()
