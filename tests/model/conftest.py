"""Model-test fixtures: a tokenizer trained on the demo world, tiny configs, demo batches."""

from __future__ import annotations

import pytest
import torch

from model.config import model_config
from model.tokenizer import Tokenizer
from tests.model.demo_data import batch_of, corpus, world_for


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(corpus(world_for(model_config("tiny")), 400), vocab_size=512)


@pytest.fixture(scope="session")
def tiny_cfg(tokenizer):
    return model_config("tiny", vocab_size=tokenizer.vocab_size)


@pytest.fixture
def demo_batch(tokenizer, tiny_cfg):
    """8 samples, some without image or audio (indices picked to include both cases)."""
    world = world_for(tiny_cfg, missing_image=0.25, missing_audio=0.25)
    batch = batch_of(world, range(8), tokenizer, tiny_cfg)
    assert not batch["has_image"].all() and not batch["has_audio"].all()
    return batch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
