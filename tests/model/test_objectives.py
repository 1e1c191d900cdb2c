"""The objective helpers on hand-built cases: masking, hard negatives, weighting."""

from __future__ import annotations

import math

import pytest
import torch

from model.multimodal import CrossModalModel
from model.objectives import (
    LossWeights,
    MultiTaskObjective,
    combine,
    contrastive,
    hard_negatives,
    info_nce,
    mask_tokens,
    nothing_applies,
)
from model.syncs import HostSyncs
from model.tokenizer import BOS, EOS, MASK, PAD


def test_mask_tokens_never_touches_specials_and_masks_at_least_one():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor(
        [[BOS, 10, 11, 12, EOS, PAD, PAD], [BOS, 20, EOS, PAD, PAD, PAD, PAD], [BOS, EOS, PAD, PAD, PAD, PAD, PAD]]
    )
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
    assert torch.isfinite(loss) and torch.isnan(parts["matching"])  # no other caption to contrast with


def test_combine_weights_tasks_and_samples():
    tasks = {
        "a": (torch.tensor([1.0, 3.0, 100.0]), torch.tensor([True, True, False])),
        "b": (torch.tensor([2.0, 2.0, 2.0]), torch.tensor([True, True, True])),
    }
    total, parts = combine(tasks, {"a": 1.0, "b": 0.5}, torch.tensor([1.0, 3.0, 1.0]))
    assert float(parts["a"]) == pytest.approx((1 * 1 + 3 * 3) / 4)  # sample weights, excluded rows ignored
    assert float(parts["b"]) == pytest.approx(2.0)
    assert float(total) == pytest.approx(float(parts["a"]) + 0.5 * 2.0)


def test_combine_reports_a_task_no_sample_applies_to_as_nan_and_adds_nothing():
    tasks = {
        "a": (torch.tensor([1.0, 3.0]), torch.tensor([False, False])),
        "b": (torch.tensor([2.0, 4.0]), torch.tensor([True, True])),
    }
    total, parts = combine(tasks, {"a": 1.0, "b": 1.0}, None)
    assert torch.isnan(parts["a"]) and float(total) == pytest.approx(3.0)
    assert not nothing_applies({k: float(v) for k, v in parts.items()})
    total, parts = combine({"a": tasks["a"]}, {"a": 1.0}, None)  # no read-back here: the caller asks
    assert float(total) == 0.0 and nothing_applies({f"loss.{k}": float(v) for k, v in parts.items()})


def test_info_nce_is_zero_only_for_perfect_separation():
    eye = torch.eye(4)
    assert info_nce(eye, eye, torch.tensor(100.0)).max() < 1e-6
    assert info_nce(eye, eye.roll(1, dims=0), torch.tensor(100.0)).min() > 10


def test_hard_negative_texts_are_extra_candidates_for_the_other_modality_only():
    eye, scale = torch.eye(4), torch.tensor(100.0)
    # A negative caption identical to sample 0's text: image 0 now has two equally good texts,
    # so its image->text term is log 2 and, averaged with the untouched text->image term, log 2 / 2.
    loss = info_nce(eye, eye, scale, b_negatives=eye[:1])
    assert float(loss[0]) == pytest.approx(math.log(2) / 2, abs=1e-5)
    assert loss[1:].max() < 1e-6
    assert info_nce(eye, eye, scale, b_negatives=-eye[:1]).max() < 1e-6  # an unlike negative costs nothing


def test_objective_scores_images_against_the_negative_captions(tiny_cfg, demo_batch):
    model = CrossModalModel(tiny_cfg).eval()
    weights = LossWeights(
        **{
            name: float(name == "contrastive")
            for name in LossWeights().to_dict()
            if not name.endswith(("ratio", "weight"))
        }
    )
    _, plain = MultiTaskObjective(weights)(model, demo_batch)
    # Each sample's own caption as its "negative": the hardest negative there is.
    with_negatives = dict(demo_batch, negative_ids=demo_batch["text_ids"], negative_mask=demo_batch["text_mask"])
    _, hard = MultiTaskObjective(weights)(model, with_negatives)
    none_given = dict(with_negatives, negative_mask=torch.zeros_like(demo_batch["text_mask"]))
    _, skipped = MultiTaskObjective(weights)(model, none_given)
    assert hard["contrastive"] > plain["contrastive"] + 0.1
    assert skipped["contrastive"] == pytest.approx(plain["contrastive"])


def test_a_weighted_hard_negative_counts_as_that_many_negatives():
    eye, scale = torch.eye(4), torch.tensor(100.0)
    # Weight 3: image 0 sees its positive and three copies of an equally good negative -> log 4.
    loss = info_nce(eye, eye, scale, b_negatives=eye[:1], negative_weight=3.0)
    assert float(loss[0]) == pytest.approx(math.log(4) / 2, abs=1e-5)


def subset_contrastive(embeddings, present, scale, negatives=None):
    """The reference: each pair's InfoNCE on the rows that have both, by indexing."""
    size = len(present["text"])
    total, count = torch.zeros(size), torch.zeros(size)
    for m1, m2 in [("text", "image"), ("text", "audio"), ("image", "audio")]:
        rows = (present[m1] & present[m2]).nonzero().squeeze(1)
        if len(rows) < 2:
            continue
        if m1 == "text":
            loss = info_nce(embeddings[m2][rows], embeddings["text"][rows], scale, negatives)
        else:
            loss = info_nce(embeddings[m1][rows], embeddings[m2][rows], scale)
        total[rows] += loss
        count[rows] += 1
    return total / count.clamp(min=1), count > 0


@pytest.mark.parametrize("seed", range(4))
def test_masked_contrastive_equals_indexing_the_rows_that_have_both(seed):
    g = torch.Generator().manual_seed(seed)
    embeddings = {
        m: torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1) for m in ("text", "image", "audio")
    }
    present = {m: torch.rand(6, generator=g) > 0.4 for m in embeddings}
    present["audio"][:5] = seed != 3  # seed 3: one sample alone has audio, so no audio pair is scored
    negatives = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    real = torch.tensor([True, False, True, True, False])
    model = type("Scale", (), {"logit_scale": torch.tensor([2.0])})()
    scale = model.logit_scale.exp()
    loss, applies = contrastive(model, embeddings, present, (negatives, real), 1.0)
    expected, expected_applies = subset_contrastive(embeddings, present, scale, negatives[real])
    assert torch.equal(applies, expected_applies)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_a_training_step_never_makes_the_host_wait_for_the_device(tiny_cfg, demo_batch):
    """Forward and backward of every task, hard negatives and modality dropout included: on a GPU
    any of these operations would stop the host queueing the step ahead of the device."""
    model = CrossModalModel(tiny_cfg)
    batch = dict(demo_batch, negative_ids=demo_batch["text_ids"], negative_mask=demo_batch["text_mask"])
    batch["negative_mask"] = batch["negative_mask"] & (torch.arange(8) % 3 != 0)[:, None]  # some rows have none
    with HostSyncs() as syncs, torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = MultiTaskObjective(LossWeights(), modality_dropout=0.3)(
            model, batch, torch.Generator().manual_seed(0)
        )
        loss.backward()
    assert syncs.count == 0, dict(syncs.sites)
    with HostSyncs() as syncs:  # and the counter does see one
        bool(loss > 0)
    assert syncs.count == 1 and "test_objectives.py" in next(iter(syncs.sites))
