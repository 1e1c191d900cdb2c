"""INT8 for CPU serving, by two routes; each returns a `SavedModel` whose `.model` is still a
`CrossModalModel` (some submodules swapped), so the evaluation code scores it unchanged.

- `torch_int8`: PyTorch dynamic INT8 (torch.ao, x86 engine) of every nn.Linear of the model -
  encoders (attention projections included), alignment, fusion, heads, decoder - with
  per-output-channel symmetric weight scales; activations are quantized per call. One Linear
  stays FP32: the audio encoder's patch embedding, whose encoder reads `embed.weight.dtype`
  (a quantized Linear has no such attribute). Conv2d and Embedding weights are INT8 in the
  folder only (weight-only storage, computed in FP32); norms, position tables, biases stay FP32.
- `onnx_int8`: the three encoder towers, each with its alignment projection, exported to ONNX
  (the audio graph includes the log-mel STFT: see onnx_towers) and quantized by onnxruntime
  (dynamic INT8 of MatMul/Gemm by default; `mode="static"`: QDQ with activation ranges from
  the calibration batches; conv and token-embedding weights stored INT8), run in onnxruntime
  sessions that return `Encoded`; fusion, heads and decoder as in `torch_int8`.

A quantized folder (`save_quantized` / `load_quantized`); JSON, safetensors and ONNX, no pickle:

    config.json          as model.io writes it (format, model config, answers, extra)
    tokenizer.json       the tokenizer
    quantized.json       {"format": "crossmodal-quantized/1", "method" and "route": the route,
                          "engine", "int8_linear": [module names], "int8_stored": [module names],
                          "onnx": {modality: {"file", "mode", "width", "parameters_fp32"}},
                          "onnx_align", "float": what stays FP32, "weights", "versions": {...}}
    weights.safetensors  FP32 tensors of everything not quantized; per INT8 module `<name>`:
                         <name>.weight_int8 (int8, weight's shape), <name>.weight_scale (float32,
                         one per output channel / row), <name>.weight_zero_point (int8, all 0),
                         and for an INT8 Linear <name>.bias (float32, if any)
    text.onnx, image.onnx, audio.onnx    onnx_int8 only: the quantized tower graphs
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

from model.config import MODALITIES, ModelConfig
from model.encoders import LogMel
from model.io import FORMAT as MODEL_FORMAT
from model.io import SavedModel
from model.multimodal import CrossModalModel
from pipelines.errors import UserError

ROUTES = ("torch_int8", "onnx_int8")
FORMAT = "crossmodal-quantized/1"
MARKER = "quantized.json"
EXPORT_TOLERANCE = 1e-2  # largest FP32 export error relative to the largest output (demo conv tower: 1.3e-3)
WEIGHTS = "weights.safetensors"
ONNX_MODES = ("dynamic", "static")
INT8_KEYS = ("weight_int8", "weight_scale", "weight_zero_point")
META_FROM_BYTES = 256 * 2**20
# Linears kept FP32, and why: their owner reads `.weight` as a tensor.
KEEP_FLOAT = {"encoders.audio.embed": "AudioEncoder reads embed.weight.dtype"}
FLOAT = (
    "computed in FP32: norms, position tables and [cls] tokens, biases, the logit scale, "
    + ", ".join(KEEP_FLOAT)
    + "; stored INT8 (weight only) but computed in FP32: Conv2d and Embedding weights (int8_stored)"
)


class QuantizeError(UserError):
    """A route that cannot quantize this model (failed export, unsupported op); one line naming the route."""

    def __init__(self, route: str, message: str):
        self.route = route
        super().__init__(f"{route}: {one_line(message)}")


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reason(err: BaseException) -> str:
    """An exception's first meaningful line (the exporters' messages run to pages)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


# -- INT8 Linear ------------------------------------------------------------------------------
def engine() -> str:
    """The quantized engine, set process-wide: x86 (fbgemm's successor) where supported."""
    supported = torch.backends.quantized.supported_engines
    chosen = next((e for e in ("x86", "fbgemm", "qnnpack") if e in supported), None)
    if chosen is None:
        raise QuantizeError("torch_int8", f"no quantized engine in this torch build ({supported})")
    if torch.backends.quantized.engine != chosen:
        torch.backends.quantized.engine = chosen
    return chosen


@contextmanager
def _quiet():
    """torch.ao warns on every quantized tensor it makes (deprecated in favour of torchao, still
    working in torch 2.13); the onnx exporter and onnxruntime's quantizer are chatty too."""
    import logging

    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root.setLevel(max(level, logging.ERROR))
        try:
            yield
        finally:
            root.setLevel(level)


def int8_parts(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """Symmetric INT8 per slice of dim 0 (a Linear's or Conv's output channel, an Embedding's
    row): int8 values, float32 scales, int8 zero points (all 0)."""
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    weight = weight.detach().float()
    observer = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    observer(weight)
    scale, zero_point = observer.calculate_qparams()
    with _quiet():
        q = torch.quantize_per_channel(weight, scale.double(), zero_point.long(), 0, torch.qint8)
    return {"weight_int8": q.int_repr(), "weight_scale": scale.float(), "weight_zero_point": zero_point.to(torch.int8)}


def dequantize(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """FP32 weights from `int8_parts` (the same arithmetic at quantization and at load)."""
    values = parts["weight_int8"]
    shape = (-1,) + (1,) * (values.dim() - 1)
    zero = parts["weight_zero_point"].float().view(shape)
    return (values.float() - zero) * parts["weight_scale"].view(shape)


def int8_linear(parts: dict[str, torch.Tensor]) -> nn.Module:
    """A dynamic INT8 Linear (torch.ao, per-channel) from `int8_parts` (+ "bias"): weights stay
    INT8, each input is quantized per call, outputs are FP32."""
    import torch.ao.nn.quantized.dynamic as nnqd

    engine()
    out_features, in_features = parts["weight_int8"].shape
    with _quiet():
        weight = torch._make_per_channel_quantized_tensor(
            parts["weight_int8"].to(torch.int8),
            parts["weight_scale"].double(),
            parts["weight_zero_point"].long(),
            0,
        )
        linear = nnqd.Linear(in_features, out_features, bias_="bias" in parts, dtype=torch.qint8)
        linear.set_weight_bias(weight, parts.get("bias"))
    return linear


def linear_parts(linear: nn.Module) -> dict[str, torch.Tensor]:
    """`int8_parts` (+ "bias") back from a dynamic INT8 Linear (what is saved)."""
    with _quiet():
        weight, bias = linear._weight_bias()
        parts = {
            "weight_int8": weight.int_repr().contiguous(),
            "weight_scale": weight.q_per_channel_scales().float(),
            "weight_zero_point": weight.q_per_channel_zero_points().to(torch.int8),
        }
    if bias is not None:
        parts["bias"] = bias.detach().float().contiguous()
    return parts


def linear_int8(linear: nn.Linear) -> nn.Module:
    parts = int8_parts(linear.weight)
    if linear.bias is not None:
        parts["bias"] = linear.bias.detach().float().clone()
    return int8_linear(parts)


def is_int8_linear(module: nn.Module) -> bool:
    import torch.ao.nn.quantized.dynamic as nnqd

    return isinstance(module, nnqd.Linear)


def quantize_linears(model: nn.Module) -> list[str]:
    """Swaps every nn.Linear (but KEEP_FLOAT) for a dynamic INT8 one, in place; returns their names."""
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear and name not in KEEP_FLOAT]
    for name in names:
        model.set_submodule(name, linear_int8(model.get_submodule(name)))
    return names


STORED_INT8 = (nn.Conv2d, nn.Embedding)


def store_int8(model: nn.Module) -> list[str]:
    """Weight-only INT8 storage of every Conv2d and Embedding (per output channel / per row): the
    weight becomes the dequantized INT8 values (computed in FP32, no INT8 kernel), and the INT8
    parts ride along as `module.int8_weight` for `save_quantized`, so a loaded folder computes
    exactly what this model does. Returns their names."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, STORED_INT8) and not hasattr(module, "int8_weight"):
            module.int8_weight = int8_parts(module.weight)
            module.weight = nn.Parameter(dequantize(module.int8_weight), requires_grad=False)
            names.append(name)
    return names


# -- routes -----------------------------------------------------------------------------------
def quantize_torch_int8(saved: SavedModel, calibration: list[dict] | None = None) -> SavedModel:
    """PyTorch dynamic INT8 of every Linear (weights per channel, activations per call). Needs no
    calibration (accepted for a uniform signature)."""
    model = copy.deepcopy(saved.model).cpu().float().eval()
    try:
        quantize_linears(model)
        store_int8(model)
    except (RuntimeError, ValueError, TypeError) as err:
        raise QuantizeError("torch_int8", reason(err)) from err
    return SavedModel(model, saved.tokenizer, list(saved.answers), dict(saved.extra))


def quantize_onnx_int8(
    saved: SavedModel, calibration: list[dict], mode: str = "dynamic", threads: int | None = None
) -> SavedModel:
    """The encoder towers (+ alignment) in onnxruntime INT8, the rest in PyTorch dynamic INT8.

    `calibration`: model batches; the first gives the export's example inputs and the check
    that the FP32 graph matches PyTorch, all of them the activation ranges in `static` mode.
    `threads`: onnxruntime's intra-op threads (default: torch's thread count now)."""
    from pipelines.compression import onnx_towers

    route = "onnx_int8"
    if mode not in ONNX_MODES:
        raise QuantizeError(route, f"mode must be one of {ONNX_MODES}, got {mode!r}")
    model = copy.deepcopy(saved.model).cpu().float().eval()
    example = example_batch(model.cfg, calibration)
    audio = onnx_towers.AudioPatches(model.cfg)
    for modality in MODALITIES:
        encoder = model.encoders[modality]
        parameters = sum(p.numel() for p in encoder.parameters()) + model.align[modality].weight.numel()
        try:
            inputs = onnx_towers.tower_inputs(modality, example, audio)
            with _quiet():
                graph = onnx_towers.export_tower(model, modality, inputs)
        except Exception as err:
            raise QuantizeError(route, f"the {modality} tower did not export to ONNX: {reason(err)}") from err
        check_export(route, modality, model, graph, example)
        try:
            calibration_feeds = [
                onnx_towers.feeds(modality, onnx_towers.tower_inputs(modality, batch, audio))
                for batch in calibration or ()
                if mode == "static"
            ]
            with _quiet():
                quantized = quantize_graph(graph, mode, calibration_feeds)
            tower = onnx_towers.OnnxTower(modality, quantized, encoder.width, parameters, model.cfg, threads)
        except Exception as err:
            raise QuantizeError(route, f"the {modality} tower did not quantize ({mode}): {reason(err)}") from err
        tower.mode = mode
        fallback = linear_int8(model.align[modality])
        model.encoders[modality] = tower
        model.align[modality] = onnx_towers.OnnxAlign(tower, fallback)
    try:
        quantize_linears(model)
        store_int8(model)
    except (RuntimeError, ValueError, TypeError) as err:
        raise QuantizeError(route, reason(err)) from err
    return SavedModel(model, saved.tokenizer, list(saved.answers), dict(saved.extra))


def example_batch(cfg: ModelConfig, calibration: list[dict] | None) -> dict:
    """Export inputs: the first calibration batch (at least 2 rows: a batch of 1 would be fixed
    into the graph), or zeros of the configured shapes when there is none."""
    keys = ("text_ids", "text_mask", "image", "audio", "audio_mask")
    batch = next((b for b in calibration or () if all(k in b for k in keys[:4])), None)
    if batch is None:
        ids = torch.full((2, 4), 5, dtype=torch.long)
        return {
            "text_ids": ids,
            "text_mask": torch.ones_like(ids, dtype=torch.bool),
            "image": torch.zeros(2, 3, cfg.image_size, cfg.image_size),
            "audio": torch.zeros(2, cfg.audio_samples),
            "audio_mask": torch.ones(2, cfg.audio_samples, dtype=torch.bool),
        }
    batch = {k: batch[k].cpu() for k in keys if k in batch}
    while batch["text_ids"].shape[0] < 2:
        batch = {k: torch.cat([v, v]) for k, v in batch.items()}
    return batch


def check_export(route: str, modality: str, model, graph: bytes, example: dict) -> None:
    """The FP32 graph (with the audio patches computed as OnnxTower does) must give the PyTorch
    tower's outputs on the export example: a silent exporter bug would otherwise pass as
    quantization error."""
    from pipelines.compression.onnx_towers import AudioPatches, feeds, session, tower_inputs

    raw = {"text": ("text_ids", "text_mask"), "image": ("image",), "audio": ("audio", "audio_mask")}[modality]
    with torch.inference_mode():
        encoded = model.encoders[modality](*(example.get(key) for key in raw))
        expected = [encoded.tokens, encoded.pooled, model.align[modality](encoded.pooled)]
    inputs = tower_inputs(modality, example, AudioPatches(model.cfg))
    got = session(graph, 1).run(["tokens", "pooled", "aligned"], feeds(modality, inputs))
    for name, want, have in zip(("tokens", "pooled", "aligned"), expected, got):
        have = torch.from_numpy(have)
        if have.shape != want.shape:
            raise QuantizeError(route, f"the exported {modality} graph gives {name} of shape {tuple(have.shape)}")
        # Relative to the outputs' scale: onnxruntime's and torch's FP32 kernels sum in other
        # orders, and GroupNorm amplifies it (the demo conv tower: 0.0055 on tokens up to 4.3); an exporter
        # bug is off by the outputs' own size.
        error = (have - want).abs().max().item() / max(1.0, want.abs().max().item())
        if error > EXPORT_TOLERANCE:
            raise QuantizeError(route, f"the exported {modality} graph disagrees with PyTorch on {name} ({error:.2g})")


def quantize_graph(graph: bytes, mode: str, calibration: list[dict]) -> bytes:
    """onnxruntime INT8 of a tower graph. dynamic: MatMul/Gemm weights INT8 (per tensor), inputs
    quantized per call; convolutions compute in FP32 (ConvInteger is slower than FP32 Conv on
    CPU). static: QDQ of MatMul/Gemm/Conv, activation ranges from `calibration` (the graph's
    input feeds). Then the FP32 weights left (Conv, the token embedding) are stored INT8
    (`int8_initializers`)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from pipelines.compression.onnx_towers import int8_initializers

    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(graph)
        if mode == "dynamic":
            quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        else:
            if not calibration:
                raise ValueError("static quantization needs calibration batches")

            class Reader(CalibrationDataReader):
                def __init__(self):
                    self.feeds = iter(calibration)

                def get_next(self):
                    return next(self.feeds, None)

            quantize_static(
                source,
                target,
                Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
                op_types_to_quantize=["MatMul", "Gemm", "Conv"],
            )
        return int8_initializers(target.read_bytes())


QUANTIZERS: dict[str, Callable[..., SavedModel]] = {"torch_int8": quantize_torch_int8, "onnx_int8": quantize_onnx_int8}


def quantize(saved: SavedModel, route: str, calibration: list[dict] | None = None, **options) -> SavedModel:
    """One route by name."""
    if route not in QUANTIZERS:
        raise QuantizeError(route, f"unknown quantization route (routes: {', '.join(ROUTES)})")
    return QUANTIZERS[route](saved, calibration or [], **options)


def quantize_all(
    saved: SavedModel, routes=ROUTES, calibration: list[dict] | None = None
) -> dict[str, SavedModel | QuantizeError]:
    """Every route on its own: a route that fails gives its QuantizeError, the others still run."""
    results: dict[str, SavedModel | QuantizeError] = {}
    for route in routes:
        try:
            results[route] = quantize(saved, route, calibration)
        except QuantizeError as err:
            results[route] = err
        except Exception as err:  # noqa: BLE001 - one route's failure must not stop the others
            results[route] = QuantizeError(route, reason(err))
    return results


def route_of(model: nn.Module) -> str:
    """Which route made this model (from its modules)."""
    from pipelines.compression.onnx_towers import OnnxTower

    if any(isinstance(m, OnnxTower) for m in model.modules()):
        return "onnx_int8"
    if any(is_int8_linear(m) for m in model.modules()):
        return "torch_int8"
    raise QuantizeError("quantize", "the model has no quantized module (not made by a quantization route)")


# -- the folder -------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    found = {}
    for package in ("torch", "onnx", "onnxruntime", "onnxscript", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def save_quantized(saved: SavedModel, route: str, folder: str | Path) -> Path:
    """Writes a quantized folder (see the module docstring); safetensors, JSON and ONNX only."""
    from safetensors.torch import save_file

    from pipelines.compression.onnx_towers import OnnxAlign, OnnxTower

    model = saved.model
    if route not in ROUTES:
        raise QuantizeError(route, f"unknown quantization route (routes: {', '.join(ROUTES)})")
    if route_of(model) != route:
        raise QuantizeError(route, f"the model was quantized by {route_of(model)}, not {route}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    int8_names, stored, onnx, replaced, skipped = [], [], {}, [], set()
    for name, module in model.named_modules():
        if hasattr(module, "int8_weight"):
            stored.append(name)
            skipped.add(f"{name}.weight")
            tensors.update({f"{name}.{key}": value for key, value in module.int8_weight.items()})
        if is_int8_linear(module):
            int8_names.append(name)
            replaced.append(name)
            tensors.update({f"{name}.{key}": value for key, value in linear_parts(module).items()})
        elif isinstance(module, OnnxTower):
            file = f"{module.modality}.onnx"
            (folder / file).write_bytes(module.model_bytes)
            onnx[module.modality] = {
                "file": file,
                "mode": getattr(module, "mode", "dynamic"),
                "width": module.width,
                "parameters_fp32": module.parameters_fp32,
            }
            replaced.append(name)
        elif isinstance(module, OnnxAlign):
            onnx.setdefault("_align", []).append(name)
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if key in skipped or any(key.startswith(f"{name}.") for name in replaced):
            continue
        value = value.detach().cpu().contiguous()
        if value.data_ptr() in seen:  # tied tensors: safetensors stores shared memory once only
            value = value.clone()
        seen.add(value.data_ptr())
        tensors[key] = value
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": FORMAT, "route": route})
    aligns = onnx.pop("_align", [])
    meta = {
        "format": FORMAT,
        "method": route,
        "route": route,
        "engine": engine(),
        "int8_linear": int8_names,
        "int8_stored": stored,
        "onnx": onnx,
        "onnx_align": aligns,
        "float": FLOAT,
        "weights": WEIGHTS,
        "versions": versions(),
    }
    config = {"format": MODEL_FORMAT, "model": model.cfg.to_dict(), "answers": saved.answers, "extra": saved.extra}
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    saved.tokenizer.save(folder)
    (folder / MARKER).write_text(json.dumps(meta, indent=2))
    return folder


def load_quantized(folder: str | Path, device: str | torch.device = "cpu", threads: int | None = None) -> SavedModel:
    """Rebuilds a quantized folder's model: the model built (on the meta device when large: no
    FP32 copy is ever allocated), INT8 Linears and ONNX towers put in place, the FP32 rest
    assigned from weights.safetensors. CPU only. `threads`: onnxruntime's intra-op threads
    (default: torch's)."""
    from safetensors.torch import load_file

    from model.tokenizer import Tokenizer
    from pipelines.compression.onnx_towers import OnnxAlign, OnnxTower

    folder = Path(folder)
    marker = folder / MARKER
    if not marker.is_file():
        raise QuantizeError("load", f"{folder}: not a quantized model folder (no {MARKER})")
    meta = json.loads(marker.read_text())
    route = meta.get("route", "?")
    if meta.get("format") != FORMAT:
        raise QuantizeError(route, f"{marker}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if torch.device(device).type != "cpu":
        raise QuantizeError(route, f"quantized models run on the CPU, not {device}")
    config = json.loads((folder / "config.json").read_text())
    cfg = ModelConfig.from_dict(config["model"])
    engine()
    # An FP32 model built only to be replaced costs its size for a moment; the meta device
    # costs none, but its first use imports torch's meta kernels (~70 MB resident, measured):
    # the cheaper one by the model's FP32 size (about 4x the INT8 files).
    fp32_bytes = 4 * sum(path.stat().st_size for path in folder.iterdir() if path.is_file())
    with torch.device("meta") if fp32_bytes > META_FROM_BYTES else nullcontext():
        model = CrossModalModel(cfg)
    tensors = load_file(str(folder / meta.get("weights", WEIGHTS)))
    for modality, info in meta.get("onnx", {}).items():
        graph = (folder / info["file"]).read_bytes()
        tower = OnnxTower(modality, graph, info["width"], info["parameters_fp32"], cfg, threads)
        tower.mode = info.get("mode", "dynamic")
        model.encoders[modality] = tower
        model.align[modality] = OnnxAlign(tower, nn.Identity())  # its fallback comes with the INT8 Linears

    def parts_of(name: str, keys=("weight_int8", "weight_scale", "weight_zero_point")) -> dict[str, torch.Tensor]:
        return {key: tensors.pop(f"{name}.{key}") for key in keys if f"{name}.{key}" in tensors}

    int8 = {name: parts_of(name, (*INT8_KEYS, "bias")) for name in meta["int8_linear"]}
    stored = {name: parts_of(name, INT8_KEYS) for name in meta.get("int8_stored", [])}
    tensors.update({f"{name}.weight": dequantize(parts) for name, parts in stored.items()})
    unexpected = set(tensors) - set(model.state_dict())
    if unexpected:
        raise QuantizeError(route, f"{folder / WEIGHTS}: tensors the model does not have: {sorted(unexpected)[:5]}")
    # The FP32 rest first (torch.ao's INT8 Linear insists on its own keys in any state dict it loads).
    model.load_state_dict(tensors, strict=False, assign=True)
    for name, parts in int8.items():
        model.set_submodule(name, int8_linear(parts))
    for name, parts in stored.items():
        model.get_submodule(name).int8_weight = parts
    refresh_buffers(model, cfg)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise QuantizeError(route, f"{folder / WEIGHTS} lacks {len(left)} tensors, e.g. {left[:5]}")
    return SavedModel(model.eval(), Tokenizer.load(folder), config.get("answers", []), config.get("extra", {}))


def refresh_buffers(model: nn.Module, cfg: ModelConfig) -> None:
    """The buffers no state dict holds (the log-mel window and filterbank), computed again."""
    for module in model.modules():
        if isinstance(module, LogMel):
            fresh = LogMel(cfg)
            module.window, module.filters = fresh.window, fresh.filters
