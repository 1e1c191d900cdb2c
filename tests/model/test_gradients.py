"""Each objective trains what it should and nothing else; frozen towers and LoRA-only training."""

from __future__ import annotations

import pytest
import torch

from model.lora import add_lora, merge_lora, trainable_parameters
from model.multimodal import CrossModalModel
from model.objectives import LossWeights, MultiTaskObjective

OFF = dict(contrastive=0, matching=0, masked_text=0, masked_image=0, masked_audio=0, caption=0, answer=0, vqa=0)
COMPONENTS = [
    "encoders.text",
    "encoders.image",
    "encoders.audio",
    "align",
    "logit_scale",
    "to_fusion",
    "fusion",
    "decoder",
    "matching_head",
    "answer_head",
    "masked_text_head",
    "image_reconstruction",
    "audio_reconstruction",
]

EXPECTED = {  # objective -> components that must receive gradient; every other component must not
    "contrastive": {"encoders.text", "encoders.image", "encoders.audio", "align", "logit_scale"},
    "matching": {"encoders.text", "encoders.image", "encoders.audio", "to_fusion", "fusion", "matching_head"},
    "masked_text": {"encoders.text", "encoders.image", "encoders.audio", "to_fusion", "fusion", "masked_text_head"},
    "masked_image": {"encoders.image", "image_reconstruction"},
    "masked_audio": {"encoders.audio", "audio_reconstruction"},
    "caption": {"encoders.image", "encoders.audio", "to_fusion", "fusion", "decoder"},
    "vqa": {"encoders.text", "encoders.image", "encoders.audio", "to_fusion", "fusion", "answer_head"},
    "answer": {"encoders.text", "encoders.image", "encoders.audio", "to_fusion", "fusion", "decoder"},
}


def components_with_gradient(model) -> set[str]:
    found = set()
    for name, param in model.named_parameters():
        if param.grad is not None and param.grad.abs().sum() > 0:
            found |= {c for c in COMPONENTS if name == c or name.startswith(c + ".")}
    return found


@pytest.mark.parametrize("objective", sorted(EXPECTED))
def test_objective_sends_gradient_only_where_it_should(tiny_cfg, demo_batch, objective):
    model = CrossModalModel(tiny_cfg)
    loss, parts = MultiTaskObjective(LossWeights(**{**OFF, objective: 1.0}))(model, demo_batch)
    assert set(parts) == {objective, "total"}
    loss.backward()
    assert components_with_gradient(model) == EXPECTED[objective]


def test_frozen_tower_gets_no_gradient_and_does_not_change(tiny_cfg, demo_batch):
    model = CrossModalModel(tiny_cfg)
    model.encoders["image"].requires_grad_(False)
    before = {k: v.clone() for k, v in model.encoders["image"].state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss, _ = MultiTaskObjective()(model, demo_batch)
    loss.backward()
    optimizer.step()
    assert all(p.grad is None for p in model.encoders["image"].parameters())
    assert all(torch.equal(before[k], v) for k, v in model.encoders["image"].state_dict().items())
    assert {"encoders.text", "encoders.audio", "fusion", "decoder"} <= components_with_gradient(model)


def test_lora_trains_only_adapters_and_merges_exactly(tiny_cfg, demo_batch):
    model = CrossModalModel(tiny_cfg).eval()
    peft_model = add_lora(model, rank=4, alpha=8)
    names = trainable_parameters(peft_model)
    assert names and all("lora_" in n for n in names)
    assert any(".fusion." in n for n in names) and any(".decoder." in n for n in names)
    assert not any(".encoders." in n for n in names)
    loss, _ = MultiTaskObjective()(peft_model.base_model.model, demo_batch)
    loss.backward()
    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    assert with_grad and with_grad <= set(names)
    with torch.no_grad():  # make the adapters do something, then check the merge keeps it
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        inner = peft_model.base_model.model
        encoded = inner.encode(demo_batch)
        present = {m: demo_batch[f"has_{m}"] for m in encoded}
        adapted = inner.fuse(encoded, present).pooled
        merged = merge_lora(peft_model)
        assert type(merged) is CrossModalModel and not any("lora_" in n for n, _ in merged.named_parameters())
        assert torch.allclose(merged.fuse(merged.encode(demo_batch), present).pooled, adapted, atol=1e-5)
