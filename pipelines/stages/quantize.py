"""Quantize: INT8 for CPU deployment (F15), every route of `quantize.routes` side by side
(`pipelines.compression.quantize`: PyTorch dynamic INT8, and the towers exported to ONNX and
quantized for onnxruntime), each scored with the evaluate stage's code and measured. The stage
keeps the route with the lowest batch-32 latency whose text-to-image recall@1 is within
`quantize.max_recall_drop` of its FP32 input, and logs why (the `routes` table); when none is,
it keeps the FP32 input and says so."""

from __future__ import annotations

import tempfile

from pipelines.compression.quantize import QuantizeError, quantize_all, save_quantized
from pipelines.config.compress import QuantizeConfig
from pipelines.dag import StageContext, StageResult
from pipelines.stages.compressed import (
    RECALL,
    describe,
    figures_of,
    input_figures,
    input_name,
    load_uri,
    model_result,
    train_batches,
)
from pipelines.stages.models import prepared_spec


def quantize(cfg: QuantizeConfig, ctx: StageContext) -> StageResult:
    spec = prepared_spec(ctx)
    source = ctx.inputs[cfg.source]
    saved = load_uri(source.outputs["model"])
    calibration = train_batches(spec, cfg.calibration_batches, cfg.batch_size)
    figures = input_figures(cfg.source, source, spec, cfg, scored=True)
    base = input_name(cfg.source)
    uris, rows = {}, []
    for route, result in quantize_all(saved, cfg.routes, calibration).items():
        if isinstance(result, QuantizeError):
            print(f"quantize: {result}")
            rows.append(route_row(route, False, str(result)))
            continue
        with tempfile.TemporaryDirectory() as folder:
            save_quantized(result, route, folder)
            uris[route] = ctx.output.child(route).upload(folder)
        figures[route] = figures_of(uris[route], spec, cfg)
    chosen, rows = choose(figures, base, list(uris), cfg.max_recall_drop, rows)
    print(describe("quantize", {name: figures[name] for name in [base, *uris]}))
    for row in rows:
        print(f"quantize: {row['route']}: {'KEPT' if row['kept'] else 'not kept'}: {row['why']}")
    uri = uris.get(chosen, source.outputs["model"])
    result = model_result(uri, figures, chosen, {"routes_ok": float(len(uris))})
    result.summary["route"] = chosen
    result.tables["routes"] = rows
    return result


def choose(figures: dict, base: str, routes: list[str], budget: float, rows: list[dict]) -> tuple[str, list[dict]]:
    """The fastest route (batch-32 latency) within the recall budget, else the FP32 input; one
    row per route saying why it was or was not kept."""
    recall = figures[base].get(RECALL, 0.0)
    fits = [r for r in routes if recall - figures[r].get(RECALL, 0.0) <= budget + 1e-9]
    chosen = min(fits, key=lambda r: figures[r]["latency_b32_ms"]) if fits else base
    for route in routes:
        drop, latency = recall - figures[route].get(RECALL, 0.0), figures[route]["latency_b32_ms"]
        speed = latency / figures[base]["latency_b32_ms"]
        if route not in fits:
            why = f"recall@1 drop {drop:.3f} > {budget:.3f}"
        elif route == chosen:
            why = f"fastest within the recall budget: {speed:.2f}x the FP32 latency, recall@1 drop {drop:.3f}"
        else:
            why = f"slower than {chosen}: {speed:.2f}x the FP32 latency (recall@1 drop {drop:.3f})"
        rows.append(route_row(route, route == chosen, why, latency, speed, figures[route]["size_mb"], drop))
    if chosen == base:
        rows.append(route_row(base, True, "no INT8 route stays within the recall budget: FP32 kept"))
    return chosen, rows


def route_row(route, kept, why, latency=None, speed=None, size=None, drop=None) -> dict:
    """One row of the routes table (every row has every column, failed routes too)."""
    return {
        "route": route,
        "kept": kept,
        "why": why,
        "latency_b32_ms": latency,
        "latency_vs_fp32": None if speed is None else round(speed, 3),
        "size_mb": size,
        "recall_drop": None if drop is None else round(drop, 4),
    }
