"""VQA per question type and the attribute confusions of wrong top-1 retrievals, on hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.data.demo_world import describe, draw_scene, parse_caption
from pipelines.evaluation.collect import Collected
from pipelines.evaluation.diagnosis import differences, question_type, summary_line, vqa_by_type, wrong_top1
from pipelines.evaluation.report import evaluation_metrics


@pytest.mark.parametrize(
    "question, kind",
    [
        ("how many shapes are there?", "count"),
        ("what colour is the circle?", "colour"),
        ("What color is the bus?", "colour"),
        ("what shape is in the top left corner?", "shape"),
        ("where is the red square?", "position"),
        ("Is the man wearing a hat?", "yes_no"),
        ("what is the man holding?", "other"),
        ("How many  dogs are in the picture?", "count"),
    ],
)
def test_question_types_come_from_the_wording(question, kind):
    assert question_type(question) == kind


def test_every_demo_caption_parses_back_to_its_scene():
    rng = np.random.default_rng(0)
    for _ in range(300):
        shapes = draw_scene(rng, (0.2, 0.5, 0.3))
        parsed = parse_caption(describe(shapes, rng))
        assert parsed == tuple((s.colour, s.kind, s.position) for s in shapes)
    assert parse_caption("a dog catching a frisbee in the park") is None
    assert parse_caption("") is None


@pytest.mark.parametrize(
    "retrieved, expected",
    [
        ((("red", "circle", "top"),), ["count"]),
        ((("red", "circle", "top"), ("blue", "square", "left")), ["none"]),
        ((("blue", "circle", "top"), ("red", "square", "left")), ["colour"]),  # colours swapped between shapes
        ((("red", "diamond", "top"), ("blue", "square", "center")), ["kind", "position"]),
    ],
)
def test_scene_differences(retrieved, expected):
    query = (("red", "circle", "top"), ("blue", "square", "left"))
    assert differences(query, retrieved) == expected


def test_wrong_top1_names_the_best_other_candidate_and_counts_ties_against_the_query():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    image = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 1.0]])
    every = torch.ones(4, dtype=torch.bool)
    queries, retrieved = wrong_top1(text, image, every, every)
    # 0: own image best; 1: image 2 beats its own; 2: ties with image 0 (a tie is a miss); 3: own best
    assert queries.tolist() == [1, 2] and retrieved.tolist() == [2, 0]
    no_image = torch.tensor([True, True, False, True])
    queries, retrieved = wrong_top1(text, image, every, no_image)  # sample 2 is no candidate and no query
    assert queries.tolist() == [1] and retrieved.tolist() == [3]  # 1's next best is now image 3


def test_vqa_accuracy_per_question_type_in_every_context():
    questions = ["how many shapes are there?", "where is the red circle?", "where is the blue square?", ""]
    answers = ["two", "top", "left", ""]
    predicted = {"image_audio": ["two", "top", "top", ""], "audio": ["one", "left", "left", ""]}
    metrics = vqa_by_type(questions, answers, predicted, np.array([0, 1, 2]))
    assert metrics == {
        "vqa.questions_by_type.count": 1,
        "vqa.questions_by_type.position": 2,
        "vqa.image_audio.by_type.count": 1.0,
        "vqa.image_audio.by_type.position": 0.5,
        "vqa.audio.by_type.count": 0.0,
        "vqa.audio.by_type.position": 0.5,
    }


def collected_with(references: list[str], text: torch.Tensor, image: torch.Tensor) -> Collected:
    n = len(references)
    return Collected(
        embeddings={"text": [text], "image": [image]},
        present={"text": [torch.ones(n, dtype=torch.bool)], "image": [torch.ones(n, dtype=torch.bool)]},
        answer_labels=[-1] * n,
        references=references,
        questions=[""] * n,
        answers=[""] * n,
    )


def test_the_evaluation_logs_how_wrong_results_differ_in_the_demo_world():
    references = [
        "a red circle at the top and a blue square on the left.",
        "there is a blue circle at the top and a red square on the left.",  # 0 with colours swapped
        "a red circle at the top.",
        "a picture of a red circle at the top.",  # the same scene as 2, another template
    ]
    text = torch.eye(4)
    image = torch.eye(4)[[1, 0, 3, 2]]  # every text retrieves its neighbour's image
    metrics = evaluation_metrics(collected_with(references, text, image))
    assert metrics["retrieval.text_to_image.wrong_top1"] == 4
    assert metrics["retrieval.text_to_image.wrong_top1_same_text"] == 0
    confused = {a: metrics[f"retrieval.text_to_image.confused.{a}"] for a in ("count", "colour", "kind", "position")}
    assert confused == {"count": 0.0, "colour": 0.5, "kind": 0.0, "position": 0.0}
    assert metrics["retrieval.text_to_image.confused.none"] == 0.5  # 2 and 3: twins
    line = summary_line(metrics)
    assert line.startswith("wrong top-1 text_to_image: 4, differing in count 0.00, colour 0.50")


def test_other_data_gets_plain_counts():
    references = ["a dog on a sofa", "a dog on a sofa", "a cat in a box"]
    text, image = torch.eye(3), torch.eye(3)[[1, 0, 2]]
    metrics = evaluation_metrics(collected_with(references, text, image))
    assert metrics["retrieval.text_to_image.wrong_top1"] == 2
    assert metrics["retrieval.text_to_image.wrong_top1_same_text"] == 2
    assert not any(".confused." in key for key in metrics)
