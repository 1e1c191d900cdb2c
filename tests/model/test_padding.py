"""Padding never changes outputs: a padded and an unpadded sample give the same embedding."""

from __future__ import annotations

import torch

from model.multimodal import CrossModalModel


def test_text_padding_does_not_change_the_embedding(tokenizer, tiny_cfg):
    model = CrossModalModel(tiny_cfg).eval()
    short = "a red circle in the center."
    alone_ids, alone_mask = tokenizer.batch([short], tiny_cfg.max_text_len)
    padded_ids, padded_mask = tokenizer.batch(
        [
            short,
            "three shapes: a red circle on the left, a blue square at "
            "the top and a green diamond in the bottom right corner.",
        ],
        tiny_cfg.max_text_len,
    )
    assert padded_ids.shape[1] > alone_ids.shape[1]
    alone = model.embed({"text": model.encode_text(alone_ids, alone_mask)})["text"]
    padded = model.embed({"text": model.encode_text(padded_ids, padded_mask)})["text"]
    assert torch.allclose(alone[0], padded[0], atol=1e-6)


def test_audio_padding_does_not_change_the_embedding(tiny_cfg):
    model = CrossModalModel(tiny_cfg).eval()
    clip = torch.randn(1, int(0.6 * tiny_cfg.sample_rate)) * 0.1
    padded = torch.zeros(1, tiny_cfg.audio_samples)
    padded[:, : clip.shape[1]] = clip
    padded[:, clip.shape[1] :] = torch.randn(1, padded.shape[1] - clip.shape[1])  # garbage past the end
    valid = torch.arange(tiny_cfg.audio_samples)[None] < clip.shape[1]
    encoder = model.encoders["audio"]
    alone = model.embed({"audio": encoder(clip, torch.ones_like(clip, dtype=torch.bool))})["audio"]
    with_padding = model.embed({"audio": encoder(padded, valid)})["audio"]
    assert torch.allclose(alone, with_padding, atol=1e-6)
    # Without the validity mask, the garbage would leak in: the mask is what protects it.
    unmasked = model.embed({"audio": encoder(padded)})["audio"]
    assert not torch.allclose(alone, unmasked, atol=1e-3)
