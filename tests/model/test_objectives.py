"""The objective helpers on hand-built cases: masking, hard negatives, weighting."""

from __future__ import annotations

import pytest
import torch

from model.multimodal import CrossModalModel
from model.objectives import LossWeights, MultiTaskObjective, combine, hard_negatives, info_nce, mask_tokens
from model.tokenizer import BOS, EOS, MASK, PAD


def test_mask_tokens_never_touches_specials_and_masks_at_least_one():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[BOS, 10, 11, 12, EOS, PAD, PAD], [BOS, 20, EOS, PAD, PAD, PAD, PAD], [BOS, EOS, PAD, PAD, PAD, PAD, PAD]])
    mask = ids != PAD
    for _ in range(50):
        masked, chosen = mask_tokens(ids, mask, 0.15, g)
        assert not chosen[:, 0].any() and not chosen[ids == EOS].any() and not chosen[ids == PAD].any()
        assert chosen[0].sum() >= 1 and chosen[1].tolist() == [False, True] + [False] * 5
        assert not chosen[2].any()  # nothing maskable: nothing masked
        assert (masked[chosen] == MASK).all() and torch.equal(masked[~chosen], ids[~chosen])


def test_hard_negatives_pick_other_texts_and_flag_rows_without_any():
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    embeddings = {"text": text, "image": text.clone()}
    present = {"text": torch.tensor([True, False, True, True]), "image": torch.ones(4, dtype=torch.bool)}
    index, found = hard_negatives(embeddings, present, g)
    assert found.all()
    assert all(i != j and present["text"][j] for i, j in enumerate(index.tolist()))
    lonely = {"text": torch.tensor([True, False, False, False]), "image": torch.ones(4, dtype=torch.bool)}
    index, found = hard_negatives(embeddings, lonely, g)
    assert found.tolist() == [False, True, True, True]  # sample 0's only candidate text is its own


def test_objective_survives_a_batch_with_one_caption(tiny_cfg, demo_batch):
    batch = dict(demo_batch, has_text=torch.tensor([True] + [False] * 7))
    loss, parts = MultiTaskObjective(LossWeights())(CrossModalModel(tiny_cfg), batch)
    assert torch.isfinite(loss) and "matching" not in parts  # no other caption to contrast with


def test_combine_weights_tasks_and_samples():
    tasks = {"a": (torch.tensor([1.0, 3.0, 100.0]), torch.tensor([True, True, False])),
             "b": (torch.tensor([2.0, 2.0, 2.0]), torch.tensor([True, True, True]))}
    total, parts = combine(tasks, {"a": 1.0, "b": 0.5}, torch.tensor([1.0, 3.0, 1.0]))
    assert parts["a"] == pytest.approx((1 * 1 + 3 * 3) / 4)  # sample weights, excluded rows ignored
    assert parts["b"] == pytest.approx(2.0)
    assert float(total) == pytest.approx(parts["a"] + 0.5 * 2.0)


def test_info_nce_is_zero_only_for_perfect_separation():
    eye = torch.eye(4)
    assert info_nce(eye, eye, torch.tensor(100.0)).max() < 1e-6
    assert info_nce(eye, eye.roll(1, dims=0), torch.tensor(100.0)).min() > 10
