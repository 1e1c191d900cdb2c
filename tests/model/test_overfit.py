"""The tiny model can learn: a few hundred CPU steps on 32 demo samples memorise them."""

from __future__ import annotations

import pytest
import torch

from model.config import model_config
from model.multimodal import CrossModalModel
from model.objectives import LossWeights, MultiTaskObjective
from tests.model.demo_data import batch_of, memorise, world_for

STEPS = 300


@pytest.mark.slow
def test_tiny_model_memorises_32_samples(tokenizer):
    cfg = model_config("tiny", vocab_size=tokenizer.vocab_size)
    world = world_for(cfg, seed=7, missing_image=0.0, missing_audio=0.0)
    batch = batch_of(world, range(32), tokenizer, cfg)
    captions = [world.sample(i)["text"].decode() for i in range(32)]
    model = CrossModalModel(cfg)
    # The two objectives the assertions measure; every objective is exercised in test_gradients.
    objective = MultiTaskObjective(
        LossWeights(matching=0, masked_text=0, masked_image=0, masked_audio=0, answer=0, vqa=0)
    )
    first, parts = memorise(model, batch, objective, STEPS)
    assert parts["total"] < 0.1 * first["total"]

    model.eval()
    with torch.no_grad():
        encoded = model.encode(batch)
        emb = model.embed(encoded)
        target = torch.arange(32)
        assert (emb["text"] @ emb["image"].T).argmax(dim=1).eq(target).all(), "text->image recall@1 < 1"
        assert (emb["audio"] @ emb["text"].T).argmax(dim=1).eq(target).all(), "audio->text recall@1 < 1"
        context = {m: encoded[m] for m in ("image", "audio")}
        fused = model.fuse(context, {m: torch.ones(32, dtype=torch.bool) for m in context})
        generated = [tokenizer.decode(ids) for ids in model.generate(fused, max_len=cfg.max_text_len)]
    assert generated == captions
