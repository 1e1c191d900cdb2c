"""Transformer building blocks: attention (self, cross, causal) with padding masks, MLP, blocks.

Masks are boolean with True = a real token. Attention uses F.scaled_dot_product_attention, so
the fused kernels run on GPU and padded keys never influence real tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import TowerConfig


def attention_mask(key_mask: torch.Tensor | None, q_len: int, causal: bool, device=None) -> torch.Tensor | None:
    """(B, 1, Lq, Lk) boolean mask for SDPA, or None when nothing is masked.

    A row whose keys are all masked (no context present) would give NaN; it attends to every
    key instead, and `Attention` then zeroes its output: no context contributes nothing.
    """
    if key_mask is None and not causal:
        return None
    mask = None
    if key_mask is not None:
        key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
        mask = key_mask[:, None, None, :]
    if causal:
        k_len = key_mask.shape[-1] if key_mask is not None else q_len
        tri = torch.ones(
            q_len, k_len, dtype=torch.bool, device=key_mask.device if key_mask is not None else device
        ).tril()
        mask = tri[None, None] if mask is None else mask & tri[None, None]
    return mask


def explicit_attention(q, k, v, mask: torch.Tensor | None, dropout: float) -> torch.Tensor:
    """Attention as two matmuls and a float32 softmax. On CPU in bf16 this is 2.5x faster than
    SDPA's flash kernel (whose backward dominated a training step); the matmuls use AMX/AVX-512."""
    scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)  # finite: no NaN on empty rows
    weights = F.dropout(torch.softmax(scores, dim=-1), dropout) if dropout else torch.softmax(scores, dim=-1)
    return weights.to(q.dtype) @ v


class Attention(nn.Module):
    """Multi-head attention; `qkv` for self-attention, `q` + `kv` for cross-attention.

    `head_dim` (default width // heads) lets a pruned layer keep fewer heads of the original
    size: the heads then span heads * head_dim channels, which `proj` maps back to the width."""

    def __init__(self, width: int, heads: int, cross: bool = False, dropout: float = 0.0, head_dim: int | None = None):
        super().__init__()
        self.heads, self.cross, self.dropout = heads, cross, dropout
        self.head_dim = width // heads if head_dim is None else head_dim
        inner = heads * self.head_dim
        if cross:
            self.q = nn.Linear(width, inner)
            self.kv = nn.Linear(width, 2 * inner)
        else:
            self.qkv = nn.Linear(width, 3 * inner)
        self.proj = nn.Linear(inner, width)

    def forward(self, x, key_mask=None, context=None, causal=False):
        batch, length, _ = x.shape
        if self.cross:
            q = self.q(x)
            k, v = self.kv(context).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(batch, -1, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        mask = attention_mask(key_mask, length, causal, x.device)
        dropout = self.dropout if self.training else 0.0
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            out = explicit_attention(q, k, v, mask, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.proj(out.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))
        if key_mask is not None:
            out = out * key_mask.any(dim=-1)[:, None, None].to(out.dtype)
        return out


class MLP(nn.Module):
    """`hidden` (default int(width * ratio)) is an exact count, for a pruned layer."""

    def __init__(self, width: int, ratio: float = 4.0, dropout: float = 0.0, hidden: int | None = None):
        super().__init__()
        hidden = int(width * ratio) if hidden is None else hidden
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm Transformer block: self-attention, optional cross-attention, MLP."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        cross: bool = False,
        dropout: float = 0.0,
        head_dim: int | None = None,
        mlp_hidden: int | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout=dropout, head_dim=head_dim)
        self.cross = None
        if cross:
            self.norm_cross = nn.LayerNorm(width)
            self.cross = Attention(width, heads, cross=True, dropout=dropout, head_dim=head_dim)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, dropout, hidden=mlp_hidden)

    def forward(self, x, mask=None, context=None, context_mask=None, causal=False):
        x = x + self.attn(self.norm1(x), key_mask=mask, causal=causal)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), key_mask=context_mask, context=context)
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    """`depth` blocks and a final LayerNorm; `block`: Block's keyword arguments."""

    def __init__(self, width: int, depth: int, heads: int, **block):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, **block) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    @classmethod
    def of(cls, tower: TowerConfig, depth: int | None = None, cross: bool = False, dropout: float = 0.0) -> Stack:
        """The blocks a tower's config describes (`depth` blocks of it, default all)."""
        return cls(
            tower.width,
            tower.depth if depth is None else depth,
            tower.heads,
            mlp_ratio=tower.mlp_ratio,
            cross=cross,
            dropout=dropout,
            head_dim=tower.head_dim,
            mlp_hidden=tower.mlp_hidden,
        )

    def forward(self, x, mask=None, context=None, context_mask=None, causal=False):
        for block in self.blocks:
            x = block(x, mask, context, context_mask, causal)
        return self.norm(x)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def init_weights(module: nn.Module) -> None:
    """Truncated-normal Linear/Embedding weights, zero biases (ViT/CLIP practice)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
