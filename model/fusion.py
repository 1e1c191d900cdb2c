"""Fusion of the modalities (F2, F3, F4) behind one interface: dict of encoded inputs -> Fused.

- early: [fusion cls] + all tokens of the present modalities, each with a modality-type
  embedding, through joint self-attention (the joint encoder, F2);
- late: no token interaction; the pooled vectors of the present modalities are merged at the
  head (masked mean, then an MLP);
- hierarchical: co-attention layers first (every modality attends to the tokens of the
  others: text<->image, text<->audio, image<->audio, F3), then joint self-attention on top.

Missing modalities (F8): an input may be absent from the dict (not in the batch) or absent
for some samples (its mask is all False for them); either way it takes no part.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from model.config import MODALITIES, ModelConfig, TowerConfig
from model.encoders import Encoded
from model.layers import MLP, Attention, Stack, masked_mean


class Fused(NamedTuple):
    """A NamedTuple for ZeRO-3's hooks, like Encoded."""

    tokens: torch.Tensor  # (B, N, W): what a decoder cross-attends to
    mask: torch.Tensor  # (B, N)
    pooled: torch.Tensor  # (B, W): what classification heads read
    spans: dict[str, slice]  # where each modality's tokens sit in `tokens`


class CoAttentionLayer(nn.Module):
    """Each modality stream cross-attends to the concatenated tokens of the other streams."""

    def __init__(self, t: TowerConfig, dropout: float):
        super().__init__()
        self.norm = nn.ModuleDict({m: nn.LayerNorm(t.width) for m in MODALITIES})
        self.cross = nn.ModuleDict(
            {m: Attention(t.width, t.heads, cross=True, dropout=dropout, head_dim=t.head_dim) for m in MODALITIES}
        )
        self.norm_mlp = nn.ModuleDict({m: nn.LayerNorm(t.width) for m in MODALITIES})
        self.mlp = nn.ModuleDict({m: MLP(t.width, t.mlp_ratio, dropout, hidden=t.mlp_hidden) for m in MODALITIES})

    def forward(self, streams: dict[str, Encoded]) -> dict[str, Encoded]:
        updated = {}
        for name, stream in streams.items():
            others = [streams[o] for o in streams if o != name]
            x = stream.tokens
            if others:  # both directions use the states from before this layer
                context = torch.cat([o.tokens for o in others], dim=1)
                context_mask = torch.cat([o.mask for o in others], dim=1)
                x = x + self.cross[name](self.norm[name](x), key_mask=context_mask, context=context)
            x = x + self.mlp[name](self.norm_mlp[name](x))
            updated[name] = Encoded(x, stream.mask, stream.pooled)
        return updated


class Fusion(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.fusion_tower
        self.strategy = cfg.fusion
        self.type_embed = nn.Embedding(len(MODALITIES), t.width)
        joint_depth = t.depth
        if self.strategy == "hierarchical":
            self.co_attention = nn.ModuleList(CoAttentionLayer(t, cfg.dropout) for _ in range(cfg.co_attention_layers))
            joint_depth = t.depth - cfg.co_attention_layers
        if self.strategy == "late":
            self.merge = nn.Sequential(
                nn.LayerNorm(t.width), MLP(t.width, t.mlp_ratio, cfg.dropout, hidden=t.mlp_hidden)
            )
        else:
            self.cls = nn.Parameter(torch.zeros(1, 1, t.width))
            nn.init.trunc_normal_(self.cls, std=0.02)
            self.joint = Stack.of(t, depth=joint_depth, dropout=cfg.dropout)

    def forward(self, inputs: dict[str, Encoded]) -> Fused:
        if not inputs:
            raise ValueError("fusion needs at least one modality")
        # Called as a module (not .weight[...]) so ZeRO-3 gathers the embedding before use.
        types = self.type_embed(torch.arange(len(MODALITIES), device=next(iter(inputs.values())).tokens.device))
        streams = {
            m: Encoded(e.tokens + types[MODALITIES.index(m)].to(e.tokens.dtype), e.mask, e.pooled)
            for m, e in inputs.items()
        }
        if self.strategy == "late":
            return self._late(streams)
        if self.strategy == "hierarchical":
            for layer in self.co_attention:
                streams = layer(streams)
        tokens, mask, spans = concat(streams, offset=1)
        cls = self.cls.expand(tokens.shape[0], -1, -1)
        cls_mask = torch.ones_like(mask[:, :1])
        x = self.joint(torch.cat([cls, tokens], dim=1), torch.cat([cls_mask, mask], dim=1))
        return Fused(x, torch.cat([cls_mask, mask], dim=1), x[:, 0], spans)

    def _late(self, streams: dict[str, Encoded]) -> Fused:
        tokens, mask, spans = concat(streams, offset=0)
        pooled = torch.stack([e.pooled for e in streams.values()], dim=1)  # (B, M, W)
        present = torch.stack([e.mask.any(dim=1) for e in streams.values()], dim=1)  # (B, M)
        merged = masked_mean(pooled, present)
        return Fused(tokens, mask, merged + self.merge(merged), spans)


def concat(streams: dict[str, Encoded], offset: int):
    """Tokens of all streams in modality order, their masks, and each stream's span."""
    spans, start = {}, offset
    for name, e in streams.items():
        spans[name] = slice(start, start + e.tokens.shape[1])
        start += e.tokens.shape[1]
    tokens = torch.cat([e.tokens for e in streams.values()], dim=1)
    mask = torch.cat([e.mask for e in streams.values()], dim=1)
    return tokens, mask, spans
