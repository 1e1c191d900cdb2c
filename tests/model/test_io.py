"""Save/load: safetensors + JSON + tokenizer in one folder, bit-identical outputs, no pickle."""

from __future__ import annotations

import json

import pytest
import torch

from model.config import ModelConfig, model_config
from model.io import SavedModel, load, save
from model.multimodal import CrossModalModel


def outputs(model, batch):
    with torch.no_grad():
        out = model(batch)
        context = {m: e for m, e in model.encode(batch).items() if m != "text"}
        out["caption"] = torch.tensor(
            sum(model.generate(model.fuse(context, {m: batch[f"has_{m}"] for m in context}), max_len=6), []) or [0]
        )
    return out


@pytest.mark.parametrize("fusion, encoder", [("hierarchical", "vit"), ("early", "conv"), ("late", "vit")])
def test_save_then_load_gives_bit_identical_outputs(tmp_path, tokenizer, tiny_cfg, demo_batch, fusion, encoder):
    cfg = model_config("tiny", vocab_size=tiny_cfg.vocab_size, fusion=fusion, image_encoder=encoder)
    model = CrossModalModel(cfg)
    model.eval()
    folder = save(SavedModel(model, tokenizer, answers=["red", "blue"], extra={"run": "abc"}), tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = load(folder)
    assert loaded.answers == ["red", "blue"] and loaded.extra == {"run": "abc"}
    assert loaded.model.cfg == cfg
    assert loaded.tokenizer.encode("a red circle", 48) == tokenizer.encode("a red circle", 48)
    before, after = outputs(model, demo_batch), outputs(loaded.model, demo_batch)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert loaded.model.decoder.head.weight is loaded.model.decoder.embed.weight


def test_config_round_trip_and_unknown_keys():
    cfg = model_config("small", fusion="early")
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown model config keys: colour"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": "red"})


def test_load_refuses_what_is_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        load(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="format 'something-else'"):
        load(tmp_path)
