"""The byte-level BPE tokenizer: round trips any language, fixed special ids, padding, save/load."""

from __future__ import annotations

import pytest

from model.tokenizer import BOS, EOS, MASK, PAD, Tokenizer


@pytest.mark.parametrize(
    "text",
    [
        "a red circle in the top left corner.",
        "广州市房地产中介协会分析",
        "Ünïcödé, emoji 🎵 and  double  spaces\ttabs",
        "",
    ],
)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, max_len=200)) == text


def test_special_tokens_have_fixed_ids(tokenizer):
    assert [tokenizer.backend.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>", "<mask>")] == [PAD, BOS, EOS, MASK]
    ids = tokenizer.encode("a blue square", max_len=48)
    assert ids[0] == BOS and ids[-1] == EOS


def test_the_corpus_vocabulary_becomes_whole_tokens(tokenizer):
    # Trained on demo captions: frequent words are single tokens, so captions are short.
    assert len(tokenizer.encode("a purple diamond in the bottom right corner.", max_len=48)) <= 12


def test_batch_pads_and_masks(tokenizer):
    ids, mask = tokenizer.batch(["a red circle", "three shapes: a red circle on the left"], max_len=48)
    assert ids.shape[0] == 2 and mask.dtype.is_floating_point is False
    assert (ids[~mask] == PAD).all() and mask[:, 0].all()
    assert mask[0].sum() < mask[1].sum()


def test_truncation_keeps_eos(tokenizer):
    ids = tokenizer.encode("a red circle " * 50, max_len=10)
    assert len(ids) == 10 and ids[-1] == EOS


def test_decode_stops_at_eos_and_drops_specials(tokenizer):
    ids = tokenizer.encode("a red circle", max_len=48)
    assert tokenizer.decode(ids + tokenizer.encode("junk", max_len=48)) == "a red circle"


def test_save_load(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode("广州 a red circle", 48) == tokenizer.encode("广州 a red circle", 48)
    assert again.vocab_size == tokenizer.vocab_size
