"""Greedy and beam-search generation: termination, length limits, and the best-scoring answer."""

from __future__ import annotations

import itertools

import pytest
import torch

from model.decoder import beam_search, greedy
from model.multimodal import CrossModalModel
from model.tokenizer import BOS, EOS

A, B, VOCAB = 4, 5, 6


def table_step(table: dict[int, dict[int, float]]):
    """Next-token log-probs that depend only on the last token (a Markov chain)."""

    def step(prefixes):
        rows = []
        for prefix in prefixes.tolist():
            probs = torch.full((VOCAB,), 1e-9)
            for token, p in table.get(prefix[-1], {}).items():
                probs[token] = p
            rows.append((probs / probs.sum()).log())
        return torch.stack(rows)

    return step


# Greedy walks A, A, A, ... (0.6, then 0.35 each); the best sequence is B <eos> (0.4 * 0.9).
TRAP = {BOS: {A: 0.6, B: 0.4}, A: {EOS: 0.3, A: 0.35, B: 0.35}, B: {EOS: 0.9, A: 0.05, B: 0.05}}


def test_beam_search_finds_the_known_best_where_greedy_does_not():
    assert greedy(table_step(TRAP), batch=1, max_len=6) == [[A] * 6]
    assert beam_search(table_step(TRAP), max_len=6, beam_size=2) == [B]


def sequence_score(table, tokens: list[int], max_len: int) -> float:
    step, prefix, total = table_step(table), [BOS], 0.0
    for token in tokens:
        total += float(step(torch.tensor([prefix]))[0, token])
        prefix.append(token)
    return total


@pytest.mark.parametrize("seed", range(5))
def test_wide_beam_equals_exhaustive_search(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = [EOS, A, B]
    table = {t: dict(zip(tokens, torch.rand(3, generator=g).softmax(0).tolist())) for t in (BOS, A, B)}
    max_len = 4
    candidates = [list(body) + [EOS] for n in range(max_len) for body in itertools.product([A, B], repeat=n)]
    candidates += [list(body) for body in itertools.product([A, B], repeat=max_len)]  # cut at max_len
    best = max(candidates, key=lambda seq: sequence_score(table, seq, max_len))
    expected = best[:-1] if best[-1] == EOS else best
    assert beam_search(table_step(table), max_len=max_len, beam_size=64) == expected


def test_generation_stops_at_eos_and_respects_max_len():
    ends_now = {BOS: {EOS: 1.0}, A: {EOS: 1.0}, B: {EOS: 1.0}}
    never_ends = {BOS: {A: 1.0}, A: {A: 1.0}, B: {A: 1.0}}
    assert greedy(table_step(ends_now), batch=3, max_len=5) == [[], [], []]
    assert greedy(table_step(never_ends), batch=2, max_len=5) == [[A] * 5, [A] * 5]
    assert beam_search(table_step(never_ends), max_len=5, beam_size=3) == [A] * 5


def test_length_penalty_prefers_longer_when_asked():
    table = {BOS: {EOS: 0.5, A: 0.5}, A: {EOS: 0.45, A: 0.55}, B: {EOS: 1.0}}
    assert beam_search(table_step(table), max_len=6, beam_size=4, length_penalty=0.0) == []
    # Per-token average log-prob: A*6 (cut at max_len) scores (ln .5 + 5 ln .55) / 6 = -0.61,
    # better than stopping at once (ln .5 = -0.69) or any A*k <eos>.
    assert beam_search(table_step(table), max_len=6, beam_size=4, length_penalty=1.0) == [A] * 6


def test_model_generation_terminates_within_max_len(tiny_cfg, demo_batch):
    model = CrossModalModel(tiny_cfg).eval()
    context = {m: e for m, e in model.encode(demo_batch).items() if m != "text"}
    fused = model.fuse(context, {m: demo_batch[f"has_{m}"] for m in context})
    for beam in (1, 3):
        out = model.generate(fused, max_len=7, beam_size=beam)
        assert len(out) == 8 and all(len(seq) <= 7 and EOS not in seq and BOS not in seq for seq in out)


def test_decoder_is_causal(tiny_cfg, demo_batch):
    """Changing a later token never changes the logits at earlier positions."""
    model = CrossModalModel(tiny_cfg).eval()
    context = {m: e for m, e in model.encode(demo_batch).items() if m != "text"}
    fused = model.fuse(context, {m: demo_batch[f"has_{m}"] for m in context})
    ids, mask = demo_batch["text_ids"].clone(), demo_batch["text_mask"]
    before = model.decode(fused, ids, mask)
    ids[:, 6] = (ids[:, 6] + 7) % tiny_cfg.vocab_size
    after = model.decode(fused, ids, mask)
    assert torch.allclose(before[:, :6], after[:, :6], atol=1e-6)
    assert not torch.allclose(before[:, 6:], after[:, 6:], atol=1e-3)
