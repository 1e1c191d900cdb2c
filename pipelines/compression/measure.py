"""What every compression stage logs for a model folder: parameters, size on disk, CPU latency of
the embedding path at batch 1 and 32, peak memory of a fresh process serving it.

    figures = measure(folder, batches, loader="model.io:load", threads=2)
    mlflow.log_metrics(figures.metrics(prefix="fp32_"))

The serving path timed is `model.embed(model.encode(batch))` on a batch with text, image and
audio, under `torch.inference_mode()`, with the thread count set explicitly (torch's intra-op
threads, and onnxruntime's for ONNX towers) and reported. The batches are the caller's (real
prepared data); batch 32 is made by concatenating them, repeated as needed.

Run as a module, it is the fresh process of `peak_memory`:
    python -m pipelines.compression.measure <loader> <folder> <batch.safetensors> <threads>
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model.tokenizer import PAD

SERVING_KEYS = ("text_ids", "text_mask", "image", "audio", "audio_mask")
Loader = Callable[[str | Path], object]  # folder -> model.io.SavedModel


@dataclass(frozen=True)
class Measurements:
    parameters: int  # weights of the model (INT8 ones and those inside ONNX towers included)
    size_bytes: int  # every file of the folder
    threads: int  # torch intra-op threads (and onnxruntime's) the latencies were measured with
    latency_b1_ms: float  # median of `repeats` runs after `warmup`
    latency_b1_p90_ms: float
    latency_b32_ms: float
    latency_b32_p90_ms: float
    peak_memory_mb: float  # peak resident memory of a fresh process: load + one batch-32 pass
    baseline_memory_mb: float  # that process's resident memory once its imports are done
    repeats: int

    def as_dict(self) -> dict:
        return asdict(self)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """Flat numeric figures for MLflow (`prefix` names the model: "fp32_", "onnx_int8_")."""
        return {f"{prefix}{key}": float(value) for key, value in asdict(self).items()}


def parameter_count(model: torch.nn.Module) -> int:
    """Weights of a model, quantized or not: FP32 parameters (tied ones once), the INT8 weights
    and biases of dynamic INT8 Linears, and for an ONNX tower the parameter count of the tower
    and projection it was exported from (its alignment fallback, a copy, not again). A tied
    weight quantized on one side only counts twice: the caption decoder's output projection,
    an INT8 copy of its FP32 token embedding (vocabulary x width)."""
    from pipelines.compression.onnx_towers import OnnxAlign, OnnxTower
    from pipelines.compression.quantize import is_int8_linear, linear_parts

    copies = {id(m.fallback) for m in model.modules() if isinstance(m, OnnxAlign)}
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for module in model.modules():
        if id(module) in copies:
            continue
        if is_int8_linear(module):
            parts = linear_parts(module)
            total += parts["weight_int8"].numel() + (parts["bias"].numel() if "bias" in parts else 0)
        elif isinstance(module, OnnxTower):
            total += module.parameters_fp32
    return total


def folder_size(folder: str | Path) -> int:
    """Bytes of every file under the folder (recursively)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def serving_batch(batches: list[dict], size: int) -> dict[str, torch.Tensor]:
    """A batch of `size` rows for the embedding path, from real batches: their text, image and
    audio rows concatenated in order (text padded to the longest), repeated if they are too few."""
    batches = [b for b in batches if all(key in b for key in SERVING_KEYS[:4])]
    if not batches:
        raise ValueError("the embedding latency needs batches with text, image and audio")
    rows, parts = 0, []
    while rows < size:
        for batch in batches:
            parts.append(batch)
            rows += batch["text_ids"].shape[0]
            if rows >= size:
                break
    length = max(part["text_ids"].shape[1] for part in parts)
    out = {}
    for key in SERVING_KEYS:
        values = [part[key] if key in part else torch.ones_like(part["audio"], dtype=torch.bool) for part in parts]
        if key in ("text_ids", "text_mask"):
            pad = PAD if key == "text_ids" else False
            values = [F.pad(v, (0, length - v.shape[1]), value=pad) for v in values]
        out[key] = torch.cat([v.cpu() for v in values])[:size].contiguous()
    return out


def embed_once(model, batch: dict) -> dict[str, torch.Tensor]:
    return model.embed(model.encode(batch))


def latency(model, batch: dict, repeats: int = 20, warmup: int = 3) -> tuple[float, float]:
    """(median, p90) milliseconds of the embedding path, after `warmup` untimed runs, at the
    current thread count."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            embed_once(model, batch)
        for _ in range(repeats):
            start = time.perf_counter()
            embed_once(model, batch)
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]


def loader_name(loader: Loader | str) -> str:
    """'module:function' of a loader a fresh process can import (no lambdas or closures)."""
    if isinstance(loader, str):
        name = loader
    else:
        name = f"{loader.__module__}:{loader.__qualname__}"
    resolve(name)
    return name


def resolve(name: str) -> Loader:
    module, _, function = name.partition(":")
    target = importlib.import_module(module)
    for part in function.split("."):
        if not part or part == "<locals>" or part == "<lambda>":
            raise ValueError(f"loader {name!r} is not importable by a fresh process (use a module-level function)")
        target = getattr(target, part)
    return target


def load_folder(folder: str | Path):
    """The default loader: a quantized folder (with quantized.json) or a model.io folder."""
    from pipelines.compression.quantize import MARKER, load_quantized

    if (Path(folder) / MARKER).is_file():
        return load_quantized(folder)
    from model.io import load

    return load(folder)


def set_threads(model, threads: int) -> None:
    """torch's intra-op threads, and onnxruntime's in every ONNX tower of the model."""
    from pipelines.compression.onnx_towers import OnnxTower

    torch.set_num_threads(threads)
    for module in model.modules():
        if isinstance(module, OnnxTower) and module.threads != threads:
            module.set_threads(threads)


def memory_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MB: VmRSS and VmHWM from /proc (the
    peak of this process image only: a fork+exec child does not inherit its parent's), else
    ru_maxrss for both."""
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        if "VmRSS" in fields and "VmHWM" in fields:
            return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peak, peak


def peak_memory(folder: str | Path, batch: dict, loader: Loader | str = load_folder, threads: int = 2) -> dict:
    """Peak resident memory (MB) of a fresh Python process that imports torch and the loader,
    loads the folder and runs the embedding path once on `batch`: what serving this model
    costs a process, runtime included. A fresh process because a process's peak never falls:
    in one process the second model measured would inherit the first one's peak. Also its
    resident memory once the imports are done (the runtime's share, alike for every model).
    Returns {"peak_memory_mb", "baseline_memory_mb"}."""
    from safetensors.torch import save_file

    name = loader_name(loader)
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = Path(tmp) / "batch.safetensors"
        save_file({k: v.contiguous() for k, v in batch.items()}, str(batch_file))
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-m", "pipelines.compression.measure", name, str(folder), str(batch_file)]
        done = subprocess.run(
            [*command, str(threads)], capture_output=True, text=True, env=env, timeout=900, check=False
        )
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-1:])
        raise RuntimeError(f"the memory probe of {folder} failed (exit {done.returncode}): {tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(
    folder: str | Path,
    batches: list[dict],
    loader: Loader | str = load_folder,
    threads: int = 2,
    repeats: int = 20,
    warmup: int = 3,
    memory: bool = True,
) -> Measurements:
    """Every figure of one model folder. The model is loaded (by `loader`) with `threads` set,
    timed at batch 1 (the first row of `batches`) and batch 32, and the thread count restored;
    `memory=False` skips the fresh process (peak figures 0)."""
    before = torch.get_num_threads()
    load = resolve(loader) if isinstance(loader, str) else loader
    try:
        torch.set_num_threads(threads)
        saved = load(folder)
        model = saved.model.eval()
        set_threads(model, threads)
        one, many = serving_batch(batches, 1), serving_batch(batches, 32)
        b1 = latency(model, one, repeats, warmup)
        b32 = latency(model, many, repeats, warmup)
        parameters = parameter_count(model)
    finally:
        torch.set_num_threads(before)
    peak = peak_memory(folder, many, loader, threads) if memory else {"peak_memory_mb": 0.0, "baseline_memory_mb": 0.0}
    return Measurements(
        parameters=parameters,
        size_bytes=folder_size(folder),
        threads=threads,
        latency_b1_ms=b1[0],
        latency_b1_p90_ms=b1[1],
        latency_b32_ms=b32[0],
        latency_b32_p90_ms=b32[1],
        peak_memory_mb=peak["peak_memory_mb"],
        baseline_memory_mb=peak["baseline_memory_mb"],
        repeats=repeats,
    )


def _probe(name: str, folder: str, batch_file: str, threads: int) -> dict:
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    load = resolve(name)
    baseline, _ = memory_mb()
    saved = load(folder)
    set_threads(saved.model, threads)
    batch = load_file(batch_file)
    with torch.inference_mode():
        embed_once(saved.model.eval(), batch)
    _, peak = memory_mb()
    return {"peak_memory_mb": peak, "baseline_memory_mb": baseline}


if __name__ == "__main__":
    print(json.dumps(_probe(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))))
