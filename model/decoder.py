"""The generative head (F5): a causal Transformer decoder over text tokens that cross-attends to
the fused tokens, for captions and free-form answers; greedy and beam-search generation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers import Stack
from model.tokenizer import BOS, EOS, MASK, PAD

NEVER_GENERATED = [PAD, BOS, MASK]

StepFn = Callable[[torch.Tensor], torch.Tensor]  # prefixes (K, t) -> next-token log-probs (K, V)


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.decoder
        self.max_len = cfg.max_text_len
        self.embed = nn.Embedding(cfg.vocab_size, t.width)
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_text_len, t.width))
        nn.init.trunc_normal_(self.pos, std=0.02)
        width = cfg.fusion_tower.width
        self.memory_proj = nn.Identity() if width == t.width else nn.Linear(width, t.width)
        self.stack = Stack.of(t, cross=True, dropout=cfg.dropout)
        self.head = nn.Linear(t.width, cfg.vocab_size, bias=False)

    def tie_weights(self) -> None:
        """Output projection shares the input embedding (saved once by safetensors)."""
        self.head.weight = self.embed.weight

    def forward(self, ids, mask, memory, memory_mask) -> torch.Tensor:
        """Teacher forcing: logits (B, L, V) for the token after each position."""
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        x = self.stack(x, mask, self.memory_proj(memory), memory_mask, causal=True)
        return self.head(x)

    def step_fn(self, memory, memory_mask) -> StepFn:
        """Next-token log-probs for prefixes that all condition on the same memory rows."""

        def step(prefixes: torch.Tensor) -> torch.Tensor:
            k = prefixes.shape[0]
            mem = memory.expand(k, -1, -1) if memory.shape[0] == 1 else memory
            mem_mask = memory_mask.expand(k, -1) if memory_mask.shape[0] == 1 else memory_mask
            logits = self(prefixes, torch.ones_like(prefixes, dtype=torch.bool), mem, mem_mask)[:, -1].float()
            logits[:, NEVER_GENERATED] = float("-inf")  # padding, <bos>, <mask> are not words to emit
            return F.log_softmax(logits, dim=-1)

        return step

    @torch.no_grad()
    def generate(
        self, memory, memory_mask, max_len: int = 32, beam_size: int = 1, length_penalty: float = 0.0
    ) -> list[list[int]]:
        """Token ids per sample (no <bos>, no <eos>), at most max_len tokens each."""
        max_len = min(max_len, self.max_len - 1)
        if beam_size == 1:
            return greedy(self.step_fn(memory, memory_mask), memory.shape[0], max_len, memory.device)
        return [
            beam_search(
                self.step_fn(memory[i : i + 1], memory_mask[i : i + 1]),
                max_len,
                beam_size,
                length_penalty,
                memory.device,
            )
            for i in range(memory.shape[0])
        ]


def greedy(step: StepFn, batch: int, max_len: int, device=None) -> list[list[int]]:
    prefixes = torch.full((batch, 1), BOS, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_len):
        next_token = step(prefixes).argmax(dim=-1)
        next_token = torch.where(done, torch.full_like(next_token, EOS), next_token)
        prefixes = torch.cat([prefixes, next_token[:, None]], dim=1)
        done |= next_token == EOS
        if done.all():
            break
    return [strip(row.tolist()[1:]) for row in prefixes]


def beam_search(step: StepFn, max_len: int, beam_size: int, length_penalty: float = 0.0, device=None) -> list[int]:
    """The highest-scoring sequence: sum of log-probs / length**length_penalty.

    A hypothesis ends at <eos> or at max_len tokens. With length_penalty 0 scores only fall as
    a hypothesis grows, so the search stops once no live beam can beat the best finished one.
    """
    beams = torch.full((1, 1), BOS, dtype=torch.long, device=device)
    scores = torch.zeros(1, device=device)
    finished: list[tuple[float, list[int]]] = []

    def final(score: float, tokens: list[int]) -> float:
        return score / max(len(tokens), 1) ** length_penalty

    for length in range(1, max_len + 1):
        log_probs = step(beams)  # (K, V)
        candidates = (scores[:, None] + log_probs).flatten()
        top = candidates.topk(min(2 * beam_size, candidates.numel()))
        vocab = log_probs.shape[1]
        live, live_scores = [], []
        for score, index in zip(top.values.tolist(), top.indices.tolist()):
            beam, token = divmod(index, vocab)
            tokens = beams[beam, 1:].tolist() + [token]
            if token == EOS:
                finished.append((final(score, tokens[:-1]), tokens[:-1]))
            elif length == max_len:
                finished.append((final(score, tokens), tokens))
            elif len(live) < beam_size:
                live.append(beams[beam].tolist() + [token])
                live_scores.append(score)
        if not live:
            break
        best_finished = max((s for s, _ in finished), default=float("-inf"))
        if length_penalty == 0.0 and best_finished >= max(live_scores):
            break
        beams = torch.tensor(live, dtype=torch.long, device=device)
        scores = torch.tensor(live_scores, device=device)
    return max(finished, key=lambda item: item[0])[1] if finished else strip(beams[0, 1:].tolist())


def strip(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens
