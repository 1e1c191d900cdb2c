"""Every fusion strategy and image encoder, on every non-empty subset of modalities (F1-F4, F8)."""

from __future__ import annotations

import itertools

import pytest
import torch

from model.config import MODALITIES, model_config
from model.multimodal import CrossModalModel, parameter_counts
from model.objectives import LossWeights, MultiTaskObjective

SUBSETS = [s for n in range(1, 4) for s in itertools.combinations(MODALITIES, n)]
FIELDS = {
    "text": ("text_ids", "text_mask", "has_text"),
    "image": ("image", "has_image"),
    "audio": ("audio", "audio_mask", "has_audio"),
}


def subset(batch, modalities):
    keep = {k for m in modalities for k in FIELDS[m]} | {"weight"}
    if "text" in modalities:
        keep |= {"question_ids", "question_mask", "answer_ids", "answer_mask", "answer_label"}
    return {k: v for k, v in batch.items() if k in keep}


@pytest.mark.parametrize("fusion", ["early", "late", "hierarchical"])
@pytest.mark.parametrize("modalities", SUBSETS, ids="+".join)
def test_forward_and_objective_on_every_subset(tiny_cfg, demo_batch, fusion, modalities):
    model = CrossModalModel(model_config("tiny", vocab_size=tiny_cfg.vocab_size, fusion=fusion))
    batch = subset(demo_batch, modalities)
    out = model(batch)
    for m in modalities:
        assert out[f"{m}_embedding"].shape == (8, tiny_cfg.embed_dim)
        assert torch.allclose(out[f"{m}_embedding"].norm(dim=-1), torch.ones(8), atol=1e-5)
    assert set(out) == {f"{m}_embedding" for m in modalities} | {"fused"}
    assert out["fused"].shape == (8, tiny_cfg.fusion_tower.width) and torch.isfinite(out["fused"]).all()
    loss, parts = MultiTaskObjective(LossWeights(), modality_dropout=0.3)(model, batch)
    assert torch.isfinite(loss) and parts["total"] > 0
    loss.backward()


@pytest.mark.parametrize("fusion", ["early", "late", "hierarchical"])
def test_fused_tokens_and_generation_shapes(tiny_cfg, demo_batch, fusion):
    model = CrossModalModel(model_config("tiny", vocab_size=tiny_cfg.vocab_size, fusion=fusion)).eval()
    encoded = model.encode(demo_batch)
    fused = model.fuse(encoded, {m: demo_batch[f"has_{m}"] for m in encoded})
    n_text, n_image, n_audio = demo_batch["text_ids"].shape[1], tiny_cfg.image_patches + 1, tiny_cfg.audio_patches + 1
    extra = 0 if fusion == "late" else 1  # the fusion [cls]
    assert fused.tokens.shape == (8, extra + n_text + n_image + n_audio, tiny_cfg.fusion_tower.width)
    assert fused.tokens[:, fused.spans["text"]].shape[1] == n_text
    logits = model.decode(fused, demo_batch["text_ids"], demo_batch["text_mask"])
    assert logits.shape == (*demo_batch["text_ids"].shape, tiny_cfg.vocab_size)
    assert model.answer_logits(fused).shape == (8, tiny_cfg.num_answers)
    assert model.match_logits(fused).shape == (8, 2)
    generated = model.generate(fused, max_len=5)
    assert len(generated) == 8 and all(len(g) <= 5 for g in generated)


def test_convolutional_student_encoder(tiny_cfg, demo_batch):
    cfg = model_config(
        "tiny",
        vocab_size=tiny_cfg.vocab_size,
        image_encoder="conv",
        image={"width": 64, "depth": 4, "heads": 2},
        conv_attention_layers=0,
    )
    model = CrossModalModel(cfg)
    assert model.image_reconstruction is None  # MAE needs patches: not for the CNN
    assert parameter_counts(model)["encoders"] < parameter_counts(CrossModalModel(tiny_cfg))["encoders"]
    loss, parts = MultiTaskObjective()(model, demo_batch)
    assert "masked_image" not in parts and torch.isfinite(loss)


def test_encoders_enter_the_fusion_stream_at_unit_scale():
    """At 0.02 init the encoders' tokens entered the fusion stream at a quarter of unit scale and
    the joint blocks drowned every cue that was not already strong (see CrossModalModel)."""
    torch.manual_seed(0)
    model = CrossModalModel(model_config("small", image_encoder="conv"))
    tokens = torch.nn.functional.layer_norm(torch.randn(4, 32, 128), (128,))  # what an encoder emits
    for modality, projection in model.to_fusion.items():
        assert 0.8 < projection(tokens).std().item() < 1.25, modality


@pytest.mark.parametrize("pool", ["mean", "flatten"])
def test_conv_pool_keeps_cells_apart_only_when_flattened(pool):
    """Swapping two cells of the feature map: a mean cannot tell, the flattened map can."""
    torch.manual_seed(0)
    encoder = CrossModalModel(model_config("tiny", image_encoder="conv", conv_pool=pool)).encoders["image"]
    out = encoder(torch.randn(2, 3, 64, 64))
    assert out.pooled.shape == (2, encoder.width)
    swapped = out.tokens.clone()
    swapped[:, [0, 5]] = out.tokens[:, [5, 0]]
    changed = (encoder.pool(swapped) - encoder.pool(out.tokens)).abs().max().item()
    assert (changed > 1e-3) == (pool == "flatten")


@pytest.mark.parametrize("patch_size, cells", [(2, 32), (4, 16), (8, 8)])
def test_conv_tokens_cover_patch_size_pixels_like_vit_patches(patch_size, cells):
    """Each token of the conv map covers patch_size x patch_size pixels: a 64-pixel image gives
    the fusion (64 / patch_size)^2 tokens, as many as the ViT's patches."""
    cfg = model_config("tiny", image_encoder="conv", patch_size=patch_size)
    out = CrossModalModel(cfg).encoders["image"](torch.randn(2, 3, 64, 64))
    assert out.tokens.shape == (2, cells * cells, cfg.image.width) and cells * cells == cfg.image_patches


@pytest.mark.parametrize("image_size, patch_size", [(64, 1), (64, 16), (48, 6)])
def test_conv_patch_size_it_cannot_reach_by_halving_is_refused(image_size, patch_size):
    # tiny: image depth 2, so the stem and two strided blocks halve the image 3 times at most
    with pytest.raises(ValueError, match="patch_size must be a power of two from 2 to 8"):
        model_config("tiny", image_encoder="conv", image_size=image_size, patch_size=patch_size)


def test_unknown_conv_pool_is_refused():
    with pytest.raises(ValueError, match="conv_pool"):
        model_config("tiny", conv_pool="max")


@pytest.mark.parametrize("fusion", ["early", "late", "hierarchical"])
def test_absent_for_a_sample_equals_absent_from_the_batch(tiny_cfg, demo_batch, fusion):
    """A sample flagged has_audio=False fuses exactly as if the batch carried no audio at all."""
    model = CrossModalModel(model_config("tiny", vocab_size=tiny_cfg.vocab_size, fusion=fusion)).eval()
    encoded = model.encode(demo_batch)
    with_flag = model.fuse(
        encoded,
        {"text": demo_batch["has_text"], "image": demo_batch["has_image"], "audio": torch.zeros(8, dtype=torch.bool)},
    )
    without = model.fuse(
        {m: encoded[m] for m in ("text", "image")}, {"text": demo_batch["has_text"], "image": demo_batch["has_image"]}
    )
    assert torch.allclose(with_flag.pooled, without.pooled, atol=1e-5)


def test_sizes_and_parameter_budget():
    assert parameter_counts(CrossModalModel(model_config("tiny")))["total"] < 2_000_000
    small = parameter_counts(CrossModalModel(model_config("small")))["total"]
    assert 2_000_000 < small < 20_000_000
