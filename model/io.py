"""Save and load a model folder: safetensors weights + config.json + tokenizer.json. No pickle.

folder/
  model.safetensors   weights (tied tensors stored once)
  config.json         {"format": ..., "model": ModelConfig, "answers": [...], "extra": {...}}
  tokenizer.json      the byte-level BPE tokenizer
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from model.config import ModelConfig
from model.multimodal import CrossModalModel
from model.tokenizer import Tokenizer

FORMAT = "crossmodal-model/1"


@dataclass
class SavedModel:
    model: CrossModalModel
    tokenizer: Tokenizer
    answers: list[str] = field(default_factory=list)  # VQA class index -> answer text
    extra: dict = field(default_factory=dict)  # free-form metadata (training run, metrics, ...)


def save(saved: SavedModel, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = saved.model
    save_model(model, str(folder / "model.safetensors"))
    meta = {"format": FORMAT, "model": model.cfg.to_dict(), "answers": saved.answers, "extra": saved.extra}
    (folder / "config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    saved.tokenizer.save(folder)
    return folder


def load(folder: str | Path, device: str | torch.device = "cpu") -> SavedModel:
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (no config.json)")
    meta = json.loads(config_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    model = CrossModalModel(ModelConfig.from_dict(meta["model"]))
    load_model(model, str(folder / "model.safetensors"), device=str(device))
    model.decoder.tie_weights()
    return SavedModel(model.to(device).eval(), Tokenizer.load(folder), meta.get("answers", []), meta.get("extra", {}))
