"""Discriminative heads (F5) and the light decoders of the reconstruction objectives (F6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import TowerConfig
from model.layers import Block


class MatchingHead(nn.Module):
    """Does this text go with this image/audio? Logits (B, 2) from the fused pooled vector."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, 2)

    def forward(self, pooled):
        return self.fc(pooled)


class AnswerHead(nn.Module):
    """VQA answer classifier over a fixed answer vocabulary."""

    def __init__(self, width: int, num_answers: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(2 * width)
        self.fc2 = nn.Linear(2 * width, num_answers)

    def forward(self, pooled):
        return self.fc2(self.norm(F.gelu(self.fc1(pooled))))


class MaskedTokenHead(nn.Module):
    """Predicts masked text tokens from fused text positions (BERT-style transform + vocab)."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab_size)

    def forward(self, tokens):
        return self.out(self.norm(F.gelu(self.fc(tokens))))


class PatchReconstructionHead(nn.Module):
    """MAE decoder: mask tokens fill the hidden patches, one block, a linear map to patch values.

    The block has its encoder tower's heads (and head_dim), and an MLP of 4x the width, or the
    tower's `mlp_hidden` once pruning has set one: a pruned config rebuilds the pruned head."""

    def __init__(self, width: int, heads: int, patches: int, patch_dim: int, tower: TowerConfig | None = None):
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.zeros(1, patches, width))
        head_dim, mlp_hidden = (tower.head_dim, tower.mlp_hidden) if tower is not None else (None, None)
        self.block = Block(width, heads, head_dim=head_dim, mlp_hidden=mlp_hidden)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, patch_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, visible: torch.Tensor, keep: torch.Tensor, total: int) -> torch.Tensor:
        """visible (B, K, W) encoder outputs of the kept patches -> predictions (B, total, patch_dim)."""
        batch, _, width = visible.shape
        full = self.mask_token.expand(batch, total, width).clone()
        full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, width), visible)
        x = self.block(full + self.pos[:, :total])
        return self.out(self.norm(x))


def random_keep(batch: int, total: int, keep: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """(B, keep) sorted random patch indices per sample."""
    noise = torch.rand(batch, total, generator=generator, device=device)
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values
