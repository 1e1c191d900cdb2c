"""The evaluate stage's metrics on hand-worked cases and against the reference libraries."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu
import torch
from pycocoevalcap.cider.cider import Cider

from pipelines.evaluation.metrics import (
    bleu4,
    caption_tokens,
    cider,
    direction_ranks,
    recall_curve,
    recall_summary,
    retrieval_ranks,
    vqa_exact,
    vqa_soft,
)


def test_ranks_and_recall_from_a_known_similarity_matrix():
    sims = torch.tensor([[0.9, 0.1, 0.5], [0.8, 0.7, 0.2], [0.3, 0.95, 0.4]])
    ranks = retrieval_ranks(sims, torch.arange(3))
    assert ranks.tolist() == [0, 1, 1]  # row 1 loses to 0.8, row 2 to 0.95
    summary = recall_summary(ranks, 3)
    assert summary["r1"] == pytest.approx(1 / 3) and summary["r5"] == 1.0
    assert summary["mean_rank"] == pytest.approx(5 / 3) and summary["queries"] == 3
    assert recall_curve(ranks, 3).tolist() == pytest.approx([1 / 3, 1.0, 1.0])


def test_ties_count_against_the_query():
    collapsed = torch.ones(4, 4)  # every candidate scores the same: nothing was retrieved
    assert retrieval_ranks(collapsed, torch.arange(4)).tolist() == [3, 3, 3, 3]
    sims = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9]])
    assert retrieval_ranks(sims, torch.tensor([0, 1])).tolist() == [1, 1]


def test_only_samples_with_both_modalities_query_and_every_target_is_a_candidate():
    text = torch.eye(4)
    image = torch.eye(4)[[0, 1, 3, 2]]  # samples 2 and 3 swapped their images
    has_text = torch.tensor([True, True, True, False])
    has_image = torch.tensor([True, True, True, True])
    ranks, candidates = direction_ranks(text, image, has_text, has_image)
    assert candidates == 4 and len(ranks) == 3
    assert ranks.tolist() == [0, 0, 3]  # sample 2's text points at sample 3's image; the rest tie at 0


@pytest.mark.parametrize(
    "hyps, refs",
    [
        (
            ["a red circle on the left", "two shapes: a blue square"],
            [["a red circle on the left"], ["a blue square at the top"]],
        ),
        (["there is a green triangle"], [["a green triangle in the center", "there is a green triangle."]]),
    ],
)
def test_bleu4_is_sacrebleu_corpus_bleu(hyps, refs):
    streams = [[r[j] for r in refs] for j in range(len(refs[0]))]
    assert bleu4(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, streams, lowercase=True).score / 100)


def test_bleu4_is_one_for_identical_text_and_zero_without_4gram_overlap():
    assert bleu4(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(1.0)
    assert bleu4(["dog"], [["the cat sat on the mat"]]) == 0.0


def test_cider_matches_pycocoevalcap_and_rewards_a_perfect_corpus():
    hyps = ["a red circle on the left.", "a blue square at the top", "a purple diamond"]
    refs = [["a red circle on the left"], ["a green square at the bottom"], ["a purple diamond in the center"]]
    expected, _ = Cider().compute_score(
        {i: [caption_tokens(r) for r in rs] for i, rs in enumerate(refs)},
        {i: [caption_tokens(h)] for i, h in enumerate(hyps)},
    )
    assert cider(hyps, refs) == pytest.approx(expected)
    perfect = cider([r[0] for r in refs], refs)
    assert perfect == pytest.approx(10.0) and cider(hyps, refs) < perfect


def test_vqa_exact_match_normalises_like_the_vqa_evaluation():
    assert vqa_exact("Two", ["2"]) == 1.0
    assert vqa_exact("the circle.", ["circle"]) == 1.0
    assert vqa_exact("square", ["circle"]) == 0.0


def test_vqa_soft_score_is_the_vqa_v2_leave_one_out_average():
    references = ["2"] * 3 + ["3"] * 7
    # "2": each of the 3 subsets without a "2" has 2 matches (2/3), the other 7 have 3 (1.0).
    assert vqa_soft("two", references) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_soft("3", references) == 1.0
    assert vqa_soft("4", references) == 0.0
    assert vqa_soft("circle", ["circle"]) == 1.0  # one reference: exact match
    assert np.isclose(vqa_soft("blue", ["blue", "navy"]), np.mean([0.0, 1 / 3]))
