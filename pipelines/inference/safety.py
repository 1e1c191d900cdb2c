"""The content filter every generated text (caption, answer) passes before it leaves the API,
the CLI or the evaluate stage (F17).

Three layers, any of which blocks: a blocklist of words and phrases, regular-expression rules,
and an optional classifier (`module:function` taking the text and returning a score in [0, 1]).
A blocked text is replaced by a neutral message and flagged; nothing is silently dropped.

Blocklist matching is done on a normalised copy of the text, so the usual evasions do not work:
- case and Unicode look-alikes: NFKC, case-folded, accents stripped, zero-width characters gone;
- character substitutions: 0->o, 1->i, 3->e, 4->a, 5->s, 7->t, @->a, $->s, ! and |->i, ...;
- punctuation inside a word ("b.a.d", "b-a-d", "b*a*d") is removed;
- spacing: a run of whole words that spells a term ("b a d", "ba d") is a hit;
- stretching: a letter repeated three or more times ("baaad") matches the single letter.
Matching is per whole word, so a blocked word inside an innocent one ("class" for "ass") is
not a hit, and doubled letters must match exactly ("good" is not "god").
"""

from __future__ import annotations

import importlib
import itertools
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from pipelines.config.evaluate import SafetyConfig

DEFAULT_BLOCKLIST = Path(__file__).with_name("blocklist.txt")
# Symbols read as letters only before a letter or digit ("b!tch", "$hit"), not as punctuation ("shit!").
SYMBOLS = {"@": "a", "$": "s", "!": "i", "|": "i", "€": "e", "£": "l", "+": "t"}
SYMBOL_AS_LETTER = re.compile("[" + re.escape("".join(SYMBOLS)) + r"](?=\w)")
SUBSTITUTIONS = str.maketrans(
    {
        "0": "o",
        "1": "i",
        "3": "e",
        "4": "a",
        "5": "s",
        "7": "t",
        "8": "b",
        "9": "g",
        # Cyrillic and Greek letters that look Latin (after case folding)
        "а": "a",
        "в": "b",
        "е": "e",
        "к": "k",
        "м": "m",
        "н": "h",
        "о": "o",
        "р": "p",
        "с": "c",
        "т": "t",
        "у": "y",
        "х": "x",
        "і": "i",
        "ј": "j",
        "ѕ": "s",
        "α": "a",
        "β": "b",
        "ε": "e",
        "ι": "i",
        "κ": "k",
        "μ": "u",
        "ν": "v",
        "ο": "o",
        "ρ": "p",
        "τ": "t",
        "υ": "u",
        "χ": "x",
    }
)
ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
WORD_CHARS = re.compile(r"[^a-z]")


@dataclass(frozen=True)
class Verdict:
    text: str  # what may be shown: the original, or the replacement when blocked
    blocked: bool
    reason: str = ""  # "blocklist: <term>", "rule: <pattern>" or "classifier: <score>"
    original: str = ""


def fold(text: str) -> str:
    """Case, width, accents and zero-width characters removed; digits and symbols read as letters."""
    text = unicodedata.normalize("NFKC", text).translate(ZERO_WIDTH).casefold()
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return SYMBOL_AS_LETTER.sub(lambda m: SYMBOLS[m.group()], text).translate(SUBSTITUTIONS)


def words(text: str) -> list[str]:
    """The normalised words of a text, punctuation inside a word removed ("b.a.d" -> "bad")."""
    tokens = (WORD_CHARS.sub("", token) for token in re.split(r"[\s_/\\]+", fold(text)))
    return [t for t in tokens if t]


def runs(word: str) -> list[tuple[str, int]]:
    return [(char, len(list(group))) for char, group in itertools.groupby(word)]


def same_word(candidate: str, term: str) -> bool:
    """Equal, or equal once a letter stretched to three or more is read as the term's letter."""
    a, b = runs(candidate), runs(term)
    return len(a) == len(b) and all(ca == cb and (na == nb or na >= 3 > nb) for (ca, na), (cb, nb) in zip(a, b))


def contains_phrase(text_words: list[str], phrase: list[str]) -> bool:
    """Some run of whole words that spells the phrase, however the spaces fall ("kill your
    self", "f uck")."""
    target = "".join(phrase)
    for start in range(len(text_words)):
        joined = ""
        for word in text_words[start:]:
            joined += word
            if same_word(joined, target):
                return True
            if len(runs(joined)) > len(runs(target)):
                break
    return False


class SafetyFilter:
    def __init__(self, cfg: SafetyConfig = SafetyConfig(), classifier: Callable[[str], float] | None = None):
        self.cfg = cfg
        listed = Path(cfg.blocklist_file or DEFAULT_BLOCKLIST).read_text(encoding="utf-8").splitlines()
        terms = [t for t in listed if t.strip() and not t.lstrip().startswith("#")] + list(cfg.blocklist)
        self.phrases = {term.strip(): words(term) for term in terms if words(term)}
        self.rules = [re.compile(pattern, re.IGNORECASE) for pattern in cfg.rules]
        self._classifier = classifier

    @cached_property
    def classifier(self) -> Callable[[str], float] | None:
        if self._classifier is not None or not self.cfg.classifier:
            return self._classifier
        module, _, name = self.cfg.classifier.partition(":")
        return getattr(importlib.import_module(module), name)

    def reason(self, text: str) -> str:
        """Why `text` is blocked, or "" when it may be shown."""
        text_words = words(text)
        for term, phrase in self.phrases.items():
            if contains_phrase(text_words, phrase):
                return f"blocklist: {term}"
        folded = fold(text)
        for rule in self.rules:
            if rule.search(text) or rule.search(folded):
                return f"rule: {rule.pattern}"
        if self.classifier is not None:
            score = float(self.classifier(text))
            if score >= self.cfg.threshold:
                return f"classifier: {score:.2f}"
        return ""

    def check(self, text: str) -> Verdict:
        if not self.cfg.enabled:
            return Verdict(text, False, "", text)
        why = self.reason(text)
        return Verdict(self.cfg.replacement if why else text, bool(why), why, text)
