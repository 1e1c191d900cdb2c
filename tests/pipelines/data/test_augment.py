"""Augmentations that must keep or break a caption's meaning on purpose."""

from __future__ import annotations

import pytest

from pipelines.config.prepare import NegativeCaptions, word_groups
from pipelines.data.augment import CONTRAST_FILE, negative_captions

CAPTION = "two shapes: a red circle on the left and a blue diamond in the bottom right corner."


def group_of(word: str) -> list[str] | None:
    return next((g for g in word_groups(CONTRAST_FILE) if word in g), None)


@pytest.mark.parametrize("seed", range(20))
def test_a_negative_caption_swaps_exactly_one_word_within_its_group(seed):
    [negative] = negative_captions(CAPTION, NegativeCaptions(p=1.0), seed)
    changed = [(a, b) for a, b in zip(CAPTION.split(), negative.split()) if a != b]
    assert len(negative.split()) == len(CAPTION.split()) and len(changed) == 1
    before, after = (w.strip(".:") for w in changed[0])
    assert group_of(before) is not None and after in group_of(before) and after != before


def test_negatives_vary_with_the_seed_and_respect_p_and_count():
    assert len({negative_captions(CAPTION, NegativeCaptions(p=1.0), seed)[0] for seed in range(20)}) > 5
    assert negative_captions(CAPTION, NegativeCaptions(p=0.0), 0) == []
    drawn = [bool(negative_captions(CAPTION, NegativeCaptions(p=0.5), seed)) for seed in range(400)]
    assert 0.4 < sum(drawn) / len(drawn) < 0.6
    three = negative_captions(CAPTION, NegativeCaptions(p=1.0, count=3), 7)
    assert len(three) == 3 and len(set(three)) == 3 and CAPTION not in three


def test_no_negative_when_no_word_can_change(tmp_path):
    assert negative_captions("a picture of nothing at all.", NegativeCaptions(p=1.0), 0) == []
    table = tmp_path / "words.txt"
    table.write_text("# comment\ncat dog\n")
    # Only one contradiction exists, however many are asked for.
    assert negative_captions("a cat sat", NegativeCaptions(p=1.0, count=3, words_file=str(table)), 0) == ["a dog sat"]


def test_words_file_is_checked_at_load_and_made_absolute(tmp_path, monkeypatch):
    from pydantic import ValidationError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "words.txt").write_text("cat dog\n")
    assert NegativeCaptions(p=1.0, words_file="words.txt").words_file == str(tmp_path / "words.txt")
    # A shipped table is kept by name (found where the code runs), even when given as a path.
    assert NegativeCaptions(p=1.0, words_file="contrast_words.txt").words_file == "contrast_words.txt"
    assert NegativeCaptions(p=1.0, words_file=str(CONTRAST_FILE)).words_file == "contrast_words.txt"
    with pytest.raises(ValidationError, match="nowhere.txt: no such file"):
        NegativeCaptions(p=1.0, words_file="nowhere.txt")
    (tmp_path / "lonely.txt").write_text("# one word per line swaps nothing\ncat\n")
    with pytest.raises(ValidationError, match="lonely.txt: no line with two or more words"):
        NegativeCaptions(p=1.0, words_file="lonely.txt")


def test_the_demo_table_swaps_only_kinds_and_positions():
    """pipelines/data/contrast_shapes_positions.txt: colour and count words stay."""
    from pathlib import Path

    table = str(Path(CONTRAST_FILE).with_name("contrast_shapes_positions.txt"))
    kept = {"two", "red", "blue"}
    for seed in range(30):
        for negative in negative_captions(CAPTION, NegativeCaptions(p=1.0, count=3, words_file=table), seed):
            assert kept <= set(negative.replace(":", " ").split())
            changed = [(a, b) for a, b in zip(CAPTION.split(), negative.split()) if a != b]
            assert len(changed) == 1 and changed[0][0].strip(".") in {"circle", "diamond", "left", "right", "bottom"}
