"""Texts encoded together and fusions run together give each call's own outputs: the objective
runs them as one call (fewer kernel launches) and must not change what it computes."""

from __future__ import annotations

import torch

from model.multimodal import CrossModalModel
from model.syncs import HostSyncs


def test_texts_of_different_lengths_encoded_together_equal_one_call_each(tiny_cfg, demo_batch):
    model = CrossModalModel(tiny_cfg).eval()
    texts = [
        (demo_batch["text_ids"], demo_batch["text_mask"]),
        (demo_batch["question_ids"], demo_batch["question_mask"]),  # shorter: padded, then trimmed back
        (demo_batch["text_ids"][:3], torch.zeros_like(demo_batch["text_mask"][:3])),  # rows with no token
    ]
    together = model.encode_texts(texts)
    for (ids, mask), joint in zip(texts[:2], together):
        alone = model.encode_text(ids, mask)
        assert joint.tokens.shape == alone.tokens.shape and torch.equal(joint.mask, mask)
        assert torch.allclose(joint.tokens[mask], alone.tokens[mask], atol=1e-5)
        assert torch.allclose(joint.pooled, alone.pooled, atol=1e-5)


def test_fusions_run_together_equal_one_call_each(tiny_cfg, demo_batch):
    model = CrossModalModel(tiny_cfg).eval()
    encoded = model.encode(demo_batch)
    present = {m: model.present(demo_batch, m, 8, "cpu") for m in encoded}
    shuffled = dict(encoded, text=type(encoded["text"])(*(t.roll(1, 0) for t in encoded["text"])))
    hidden = dict(present, image=torch.zeros(8, dtype=torch.bool))  # another presence per variant
    variants = [(encoded, present), (shuffled, present), (encoded, hidden)]
    with HostSyncs() as syncs:
        together = model.fuse_together(variants)
    assert syncs.count == 0
    for variant, joint in zip(variants, together):
        alone = model.fuse(*variant)
        assert joint.spans == alone.spans and torch.equal(joint.mask, alone.mask)
        assert torch.allclose(joint.pooled, alone.pooled, atol=1e-5)
        assert torch.allclose(joint.tokens[joint.mask], alone.tokens[alone.mask], atol=1e-5)
