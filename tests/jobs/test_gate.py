"""The promotion gate: which challenger is promoted, and the report says why."""

from __future__ import annotations

import pytest

from jobs.gate import decide, markdown
from pipelines.config.nightly import GateConfig

GATE = GateConfig(
    metrics={"retrieval.text_to_image.r1": 0.01, "retrieval.image_to_text.r1": 0.01},
    guarded={"latency_b32_ms": 0.10, "robustness.vqa.without_image.exact": 0.02, "vqa.image_audio.exact": 0.02},
)
CHAMPION = {
    "retrieval.text_to_image.r1": 0.80,
    "retrieval.image_to_text.r1": 0.78,
    "latency_b32_ms": 40.0,
    "robustness.vqa.without_image.exact": 0.10,
    "vqa.image_audio.exact": 0.70,
}


def challenger(**changes: float) -> dict:
    figures = dict(CHAMPION)
    for key, value in changes.items():
        figures[key.replace("__", ".")] = value
    return figures


BETTER = {"retrieval__text_to_image__r1": 0.85, "retrieval__image_to_text__r1": 0.80}


@pytest.mark.parametrize(
    ("case", "changes", "promoted", "named"),
    [
        ("better on every gate metric", BETTER, True, "better on every gate metric"),
        (
            "worse",
            {"retrieval__text_to_image__r1": 0.70, "retrieval__image_to_text__r1": 0.70},
            False,
            "(needs >= 0.81)",
        ),
        ("a tie", {}, False, "retrieval.text_to_image.r1 0.8 vs champion 0.8"),
        (
            "a win inside the margin",
            {"retrieval__text_to_image__r1": 0.805, "retrieval__image_to_text__r1": 0.785},
            False,
            "needs >= 0.81",
        ),
        ("better on one gate metric only", {"retrieval__text_to_image__r1": 0.85}, False, "retrieval.image_to_text.r1"),
        (
            "slower beyond the tolerance",
            {**BETTER, "latency_b32_ms": 44.5},
            False,
            "latency_b32_ms regressed: 44.5 vs champion 40 (allowed <= 44)",
        ),
        ("slower within the tolerance", {**BETTER, "latency_b32_ms": 43.9}, True, "promoted"),
        (
            "less robust",
            {**BETTER, "robustness__vqa__without_image__exact": 0.13},
            False,
            "robustness.vqa.without_image.exact regressed",
        ),
        (
            "worse on a guarded quality metric",
            {**BETTER, "vqa__image_audio__exact": 0.67},
            False,
            "vqa.image_audio.exact regressed",
        ),
    ],
)
def test_gate_decision_and_reason(case, changes, promoted, named):
    decision = decide(challenger(**changes), CHAMPION, GATE)
    assert decision.promote is promoted, (case, decision.reason)
    assert named in decision.reason, (case, decision.reason)
    report = markdown(decision, "crossmodal version 3", "version 2")
    assert ("**PROMOTED**" if promoted else "**NOT PROMOTED**") in report
    assert report.count("| pass |") + report.count("| **FAIL** |") == len(GATE.metrics) + len(GATE.guarded)


def test_exactly_the_margin_is_a_win():
    figures = challenger(retrieval__text_to_image__r1=0.8125, retrieval__image_to_text__r1=0.7925)
    assert decide(figures, CHAMPION, GATE).promote


def test_no_champion_promotes_the_first_model():
    decision = decide(challenger(), None, GATE)
    assert decision.promote and "no champion yet" in decision.reason


def test_a_gate_metric_neither_model_has_is_skipped_and_one_only_the_champion_has_fails():
    gate = GateConfig(metrics={**GATE.metrics, "retrieval.audio_to_text.r1": 0.01}, guarded={})
    skipped = decide(challenger(**BETTER), CHAMPION, gate)
    assert skipped.promote
    assert [c.passed for c in skipped.checks if c.metric == "retrieval.audio_to_text.r1"] == [None]
    lost = decide(challenger(**BETTER), {**CHAMPION, "retrieval.audio_to_text.r1": 0.5}, gate)
    assert not lost.promote and "retrieval.audio_to_text.r1 not measured for the challenger" in lost.reason


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"metrics": {}}, "at least one metric"),
        ({"metrics": {"a": 0.0}}, "margins must be > 0"),
        ({"guarded": {"a": -1}}, ">= 0"),
    ],
)
def test_gate_config_is_validated(section, message):
    with pytest.raises(ValueError, match=message):
        GateConfig(**section)
