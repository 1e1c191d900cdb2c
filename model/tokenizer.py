"""A byte-level BPE tokenizer trained on the corpus with the `tokenizers` library.

Byte-level: any UTF-8 text (Chinese included) round-trips, no unknown tokens. Special tokens
sit at fixed ids so padding and masking never depend on the training corpus.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

SPECIALS = ("<pad>", "<bos>", "<eos>", "<mask>")
PAD, BOS, EOS, MASK = range(len(SPECIALS))
FILENAME = "tokenizer.json"


class Tokenizer:
    def __init__(self, backend: HFTokenizer):
        self.backend = backend
        for expected, token in enumerate(SPECIALS):
            if backend.token_to_id(token) != expected:
                raise ValueError(f"tokenizer must map {token} to id {expected}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 512) -> Tokenizer:
        backend = HFTokenizer(models.BPE())
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def load(cls, folder: str | Path) -> Tokenizer:
        return cls(HFTokenizer.from_file(str(Path(folder) / FILENAME)))

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(text))

    def to_json(self) -> str:
        return self.backend.to_str()

    def save(self, folder: str | Path) -> None:
        self.backend.save(str(Path(folder) / FILENAME))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def encode(self, text: str, max_len: int) -> list[int]:
        """<bos> tokens <eos>, truncated to max_len (the <eos> is kept)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids[: max_len - 2]
        return [BOS, *ids, EOS]

    def batch(self, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) padded to the longest text in the batch; mask is True on real tokens."""
        encoded = [self.encode(t, max_len) for t in texts]
        width = max((len(e) for e in encoded), default=2)
        ids = torch.full((len(texts), width), PAD, dtype=torch.long)
        for row, e in enumerate(encoded):
            ids[row, : len(e)] = torch.tensor(e)
        return ids, ids != PAD

    def decode(self, ids: Iterable[int]) -> str:
        """Text up to the first <eos>, without special tokens."""
        kept = []
        for token in ids:
            token = int(token)
            if token == EOS:
                break
            if token >= len(SPECIALS):
                kept.append(token)
        return self.backend.decode(kept)
