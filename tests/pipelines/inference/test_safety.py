"""The content filter (F17): listed evasions are blocked, benign text passes unchanged."""

from __future__ import annotations

import pytest

from pipelines.inference.safety import SafetyConfig, SafetyFilter

CFG = SafetyConfig(blocklist_file=None, blocklist=["dirty word"], rules=[r"\b\d{3}-\d{2}-\d{4}\b"])


@pytest.fixture(scope="module")
def safety() -> SafetyFilter:
    return SafetyFilter(CFG)


@pytest.mark.parametrize(
    "text, term",
    [
        ("that is shit", "shit"),
        ("SHIT", "shit"),  # case
        ("ShIt happens", "shit"),
        ("s h i t", "shit"),  # spacing
        ("sh it", "shit"),
        ("s.h.i.t", "shit"),  # punctuation
        ("s-h-i-t!", "shit"),
        ("sh*t", None),  # a masked letter is not the word: left to rules/classifier
        ("sh1t", "shit"),  # character substitutions
        ("$hit", "shit"),
        ("5h!t", "shit"),
        ("shiiiiit", "shit"),  # stretching
        ("ｓｈｉｔ", "shit"),  # full-width
        ("shіt", "shit"),  # Cyrillic i
        ("ŝhít", "shit"),  # accents
        ("sh\u200bit", "shit"),  # zero-width space
        ("a d1rty   w0rd", "dirty word"),  # configured phrase, spaced and substituted
        ("k i l l  your-self", "kill yourself"),
    ],
)
def test_evasions_are_blocked(safety, text, term):
    verdict = safety.check(text)
    assert verdict.blocked is (term is not None)
    if term:
        assert verdict.reason == f"blocklist: {term}"
        assert verdict.text == CFG.replacement and verdict.original == text


@pytest.mark.parametrize(
    "text",
    [
        "a red circle on the left and a blue diamond in the bottom right corner.",
        "the class is assessing a classic bass",  # blocked words inside innocent ones
        "as good as it gets",  # 'as' is not 'ass', 'good' is not 'god'
        "a cocktail at the scunthorpe shitake stand",
        "3 shapes: 1 red, 2 blue",
        "",
    ],
)
def test_benign_text_passes_unchanged(safety, text):
    verdict = safety.check(text)
    assert not verdict.blocked and verdict.text == text and verdict.reason == ""


def test_rules_and_the_classifier_hook():
    safety = SafetyFilter(CFG, classifier=lambda text: 0.9 if "forbidden" in text else 0.1)
    assert safety.check("call 123-45-6789").reason == r"rule: \b\d{3}-\d{2}-\d{4}\b"
    assert safety.check("a forbidden topic").reason == "classifier: 0.90"
    assert not safety.check("a permitted topic").blocked


def test_classifier_by_dotted_path_and_disabling():
    classifier = "tests.pipelines.inference.test_safety:always_unsafe"
    by_path = SafetyFilter(SafetyConfig(classifier=classifier, threshold=0.7))
    assert by_path.check("anything").reason == "classifier: 0.80"
    assert not SafetyFilter(SafetyConfig(enabled=False)).check("shit").blocked


def always_unsafe(text: str) -> float:
    return 0.8
