"""Compression targets on the demo-trained models: each compressed model against its input,
measured in this one process (CPU latency of the embedding path at batch 1 and 32, size on
disk, parameters), with recall@1 from each model's stage run (the evaluate stage's code on the
test split: scores do not depend on the machine, timings do).

    python benchmarks/compression.py [--config pipelines/configs/demo.yaml] [--set k=v]
    python benchmarks/compression.py --synthetic     # random weights at the config's shapes

Targets (each printed as a ratio, with met / MISSED):
    quantized vs its FP32 input   latency@32 <= 0.5x, size <= 0.3x, recall@1 drop <= 1 point
    pruned vs unpruned            latency@32 <= 0.65x, recall@1 drop <= 2 points
    student vs teacher            parameters <= 0.25x, latency@32 <= 0.35x, recall@1 >= 90%
--synthetic needs no demo run: the models are built with random weights (pruned by weight
magnitude, quantized on synthetic calibration batches); it prints the cost ratios only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.io import SavedModel, save
from model.multimodal import CrossModalModel
from model.prune import prune
from model.synthetic import synthetic_batch
from model.tokenizer import Tokenizer
from pipelines import env
from pipelines.compression import measure
from pipelines.compression.quantize import QuantizeError, quantize_all, save_quantized
from pipelines.config import load_config
from pipelines.config.train import chosen_model
from pipelines.storage import Storage

RECALL = "retrieval.text_to_image.r1"
DEMO = Path(__file__).resolve().parent.parent / "pipelines" / "configs" / "demo.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEMO))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--synthetic", action="store_true", help="random weights at the config's shapes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batches", type=int, default=2, help="real test batches of 32 the latencies use")
    args = parser.parse_args()
    env.configure()
    cfg = load_config(args.config, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        models, recall, batches = synthetic(cfg, Path(tmp)) if args.synthetic else from_demo_run(cfg, args.batches)
        print(f"compression benchmark: {len(models)} models, {args.threads} threads, median of {args.repeats} runs")
        figures = {}
        for name, folder in models.items():
            cost = measure.measure(folder, batches, threads=args.threads, repeats=args.repeats)
            figures[name] = cost.as_dict() | ({RECALL: recall[name]} if name in recall else {})
            print(
                f"  {name:11} {cost.parameters:>11,} parameters  {cost.size_bytes / 1e6:7.2f} MB  "
                f"{cost.latency_b1_ms:7.1f} ms @1  {cost.latency_b32_ms:8.1f} ms @32  "
                f"peak {cost.peak_memory_mb:5.0f} MB" + (f"  t2i R@1 {recall[name]:.3f}" if name in recall else "")
            )
    return report(figures)


def from_demo_run(cfg, count: int):
    """The model folders of the config's finished train, distill, prune and quantize runs
    (found by identity, as `crossmodal stages` does), their recall@1, and real test batches."""
    from pipelines.runner import plan_state
    from pipelines.training.standalone import ShardStream

    finished = {stage.name: prior for stage, _, prior in plan_state(cfg) if prior is not None}
    missing = [name for name in ("train", "evaluate", "distill", "prune", "quantize") if name not in finished]
    if missing:
        raise SystemExit(f"compression.py: no finished {', '.join(missing)} run for this config: run `make demo` first")
    local = lambda uri: Storage(uri).local_copy()  # noqa: E731
    models = {
        "teacher": local(finished["train"][2].outputs["model"]),
        "student": local(finished["distill"][2].outputs["model"]),
        "pruned": local(finished["prune"][2].outputs["model"]),
    }
    quantize = finished["quantize"][2]
    figures = quantize.summary["figures"]
    for route in ("torch_int8", "onnx_int8"):
        if route in figures:
            models[route] = local(Storage(finished["quantize"][1]).child(route).uri)
    recall = {name: values[RECALL] for name, values in figures.items() if RECALL in values}
    recall["teacher"] = finished["evaluate"][2].metrics[RECALL]
    from pipelines.data.collate import to_model_batch
    from pipelines.data.dataset import DatasetSpec

    spec = DatasetSpec(**Storage(finished["prepare"][2].outputs["spec"]).read_json())
    stream = ShardStream(spec, cfg.evaluate.split, 0, 1, 0, 32, train=False)
    batches = []
    for batch in stream:
        batches.append(to_model_batch({k: torch.as_tensor(v) for k, v in batch.items() if k != "key"}))
        if len(batches) == count:
            break
    return models, recall, batches


def synthetic(cfg, folder: Path):
    """Random-weight teacher and student at the config's shapes, pruned and quantized here."""
    sizes = cfg.prepare.model_sizes() | {"num_answers": 32}
    tokenizer = Tokenizer.train(["a red circle", "a blue square"], vocab_size=300)
    teacher = CrossModalModel(chosen_model(cfg.train, **sizes)).eval()
    student = CrossModalModel(chosen_model(cfg.distill, **sizes)).eval()
    pruned = prune(student, cfg.prune.heads, cfg.prune.mlp, cfg.prune.conv).eval()
    batches = [synthetic_batch(student.cfg, 32, seed=i) for i in range(2)]
    models = {}
    for name, model in (("teacher", teacher), ("student", student), ("pruned", pruned)):
        models[name] = save(SavedModel(model, tokenizer), folder / name)
    for route, result in quantize_all(SavedModel(pruned, tokenizer), cfg.quantize.routes, batches).items():
        if isinstance(result, QuantizeError):
            print(f"  {route}: {result}")
            continue
        models[route] = save_quantized(result, route, folder / route)
    return models, {}, batches


TARGETS = (
    # (what, numerator, denominator, figure, at most / at least, bound)
    ("student vs teacher: parameters", "student", "teacher", "parameters", "<=", 0.25),
    ("student vs teacher: latency@32", "student", "teacher", "latency_b32_ms", "<=", 0.35),
    ("student vs teacher: recall@1", "student", "teacher", RECALL, ">=", 0.90),
    ("pruned vs unpruned: latency@32", "pruned", "student", "latency_b32_ms", "<=", 0.65),
    ("quantized vs FP32 input: latency@32", "{q}", "pruned", "latency_b32_ms", "<=", 0.5),
    ("quantized vs FP32 input: size", "{q}", "pruned", "size_bytes", "<=", 0.3),
)
DROPS = (
    ("pruned vs unpruned: recall@1 drop", "pruned", "student", 0.02),
    ("quantized vs FP32 input: recall@1 drop", "{q}", "pruned", 0.01),
)


def report(figures: dict) -> int:
    routes = [r for r in ("onnx_int8", "torch_int8") if r in figures]
    for quantized in routes:
        print(f"targets with the {quantized} route:")
        for what, top, bottom, key, sense, bound in TARGETS:
            top = top.format(q=quantized)
            if key not in figures[top] or key not in figures[bottom]:
                continue
            ratio = figures[top][key] / figures[bottom][key]
            met = ratio <= bound if sense == "<=" else ratio >= bound
            print(f"  {what:40} {ratio:6.3f}  (target {sense} {bound})  {'met' if met else 'MISSED'}")
        for what, top, bottom, bound in DROPS:
            top = top.format(q=quantized)
            if RECALL in figures[top] and RECALL in figures[bottom]:
                drop = figures[bottom][RECALL] - figures[top][RECALL]
                print(
                    f"  {what:40} {100 * drop:6.2f} points (target <= {100 * bound:.0f})  "
                    f"{'met' if drop <= bound + 1e-9 else 'MISSED'}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
