"""Load any model folder: the model library's folder (FP32, or pruned with smaller shapes) or a
quantized folder (`quantized.json` beside config.json/tokenizer.json, with its route files).

    saved = load_any("runs/storage/stages/compress/<id>/model")   # -> model.io.SavedModel
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.io import SavedModel, load

QUANTIZED_MARKER = "quantized.json"


def is_quantized(folder: str | Path) -> bool:
    return (Path(folder) / QUANTIZED_MARKER).is_file()


def load_any(folder: str | Path, device: str | torch.device = "cpu") -> SavedModel:
    """`load_quantized` for a folder with quantized.json (CPU only), else `model.io.load`.
    ValueError (QuantizeError is one) or FileNotFoundError for a folder that does not load."""
    folder = Path(folder)
    if is_quantized(folder):
        try:
            from pipelines.compression.quantize import load_quantized
        except ImportError as err:  # the quantization runtime (e.g. onnxruntime) is missing here
            raise ValueError(f"{folder}: a quantized model folder, but it cannot be loaded here: {err}") from err
        return load_quantized(folder, device)
    return load(folder, device)
