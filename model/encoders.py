"""One encoder per modality (F1). Each returns tokens, their padding mask and a pooled vector.

- text: token + position embeddings, Transformer; pooled at <bos>.
- image: ViT (patch embedding, [cls], Transformer; pooled at [cls]) or a light CNN (full 3x3
  convs while it down-samples, depthwise-separable blocks after, then attention blocks over
  its feature map; pooled by the mean of its cells or a linear map of the whole map).
- audio: log-mel spectrogram computed in torch, patches of a few frames, Transformer;
  pooled at [cls]. Frames that overlap padding are masked, so padding never changes outputs.

ViT and audio take `keep`: indices of the patches to encode (MAE-style masking).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from model.config import ModelConfig
from model.layers import Stack


class Encoded(NamedTuple):
    """A NamedTuple, not a dataclass: ZeRO-3 finds the tensors of a module's output only in
    tuples, lists and dicts, and without them its pre-backward hooks never gather parameters."""

    tokens: torch.Tensor  # (B, N, W)
    mask: torch.Tensor  # (B, N) True on real tokens
    pooled: torch.Tensor  # (B, W)


def gather_patches(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), keep (B, K) indices -> (B, K, D)."""
    return torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class TextEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.text
        self.width = t.width
        self.embed = nn.Embedding(cfg.vocab_size, t.width)
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_text_len, t.width))
        self.stack = Stack.of(t, dropout=cfg.dropout)
        nn.init.trunc_normal_(self.pos, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Encoded:
        x = self.embed(ids) + self.pos[:, : ids.shape[1]]
        x = self.stack(x, mask)
        return Encoded(x, mask, x[:, 0])


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t, p = cfg.image, cfg.patch_size
        self.width, self.patch_size = t.width, p
        self.patch_dim = 3 * p * p
        self.embed = nn.Conv2d(3, t.width, kernel_size=p, stride=p)
        self.cls = nn.Parameter(torch.zeros(1, 1, t.width))
        self.pos = nn.Parameter(torch.zeros(1, 1 + cfg.image_patches, t.width))
        self.stack = Stack.of(t, dropout=cfg.dropout)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)

    def patchify(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, 3*p*p) pixel patches in the patch-embedding order."""
        p = self.patch_size
        b, c, h, w = image.shape
        x = image.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def forward(self, image: torch.Tensor, keep: torch.Tensor | None = None) -> Encoded:
        x = self.embed(image.to(self.embed.weight.dtype)).flatten(2).transpose(1, 2) + self.pos[:, 1:]
        if keep is not None:
            x = gather_patches(x, keep)
        cls = (self.cls + self.pos[:, :1]).expand(x.shape[0], -1, -1)
        x = self.stack(torch.cat([cls, x], dim=1))
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return Encoded(x, mask, x[:, 0])


def norm2d(channels: int) -> nn.GroupNorm:
    """GroupNorm where MobileNet has BatchNorm: no running statistics, so the block is the same in
    training and evaluation, on every data-parallel rank, and in bf16 (BatchNorm's fp32 buffers
    break a bf16 engine)."""
    return nn.GroupNorm(math.gcd(8, channels), channels)


class SeparableBlock(nn.Module):
    """MobileNet block: depthwise 3x3 conv then pointwise 1x1 conv, each with a norm and ReLU6."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.depthwise = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), norm2d(c_in), nn.ReLU6()
        )
        self.pointwise = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), norm2d(c_out), nn.ReLU6())

    def forward(self, x):
        return self.pointwise(self.depthwise(x))


def full_conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """A plain 3x3 conv with norm and ReLU6: EfficientNetV2's choice over depthwise-separable
    blocks where channels are few and the map is large (cheap there, and it learns edges and
    corners - the shape of things - much faster: 0.97 vs 0.86 shape accuracy after 400 steps
    in a probe on the demo world)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), norm2d(c_out), nn.ReLU6())


def conv_widths(cfg: ModelConfig) -> list[int]:
    """Output channels of the conv encoder's stem and of each of its blocks: doubling from a
    quarter of the width, the last always the width (`cfg.conv_channels` overrides the others)."""
    width, depth = cfg.image.width, cfg.image.depth
    if cfg.conv_channels is not None:
        return [*cfg.conv_channels, width]
    stem = max(8, width // 4)
    widths = [stem] + [min(width, stem * 2 ** (i + 1)) for i in range(depth)]
    widths[-1] = width
    return widths


class ConvEncoder(nn.Module):
    """A light image tower: stride-2 stem, `depth` conv blocks, then `conv_attention_layers`
    Transformer blocks over the feature map (a hybrid, as in ViT-hybrid and CLIP's attention
    pool). The down-sampling blocks are full convs, the rest MobileNet's depthwise-separable
    blocks. Why attention before pooling: a mean over conv features is a bag of what is where,
    and cannot say which colour or shape sits in which cell. In a probe on the demo world that
    asks exactly that (the shape of each grid cell), mean pooling got 4% of images right after
    500 steps, one attention block 79%, two 80% (and 53% for colours, against 2%).
    `conv_pool: flatten` is the cheap half of that: a linear map of the whole feature map to
    the pooled vector, so the embedding knows which cell holds what (binding within a cell is
    still the conv features' job)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        width, depth = cfg.image.width, cfg.image.depth
        self.width = width
        widths = conv_widths(cfg)
        self.stem = full_conv_block(3, widths[0], 2)
        # Down-sample in the first blocks until each cell of the map covers patch_size x patch_size
        # pixels, as the ViT's patches do: the fusion reads one token per cell, and the tokens'
        # count, not this tower, is what the fusion's cost grows with.
        strided = int(math.log2(cfg.patch_size)) - 1  # the stem halves once
        self.blocks = nn.Sequential(
            *(
                full_conv_block(widths[i], widths[i + 1], 2)
                if i < strided
                else SeparableBlock(widths[i], widths[i + 1], 1)
                for i in range(depth)
            )
        )
        side = cfg.image_size // cfg.patch_size
        # Where each cell of the feature map is: captions and questions talk about positions.
        self.pos = nn.Parameter(torch.zeros(1, side * side, width))
        # At the scale of the features it is added to (GroupNorm + ReLU6: ~0.5), not ViT's 0.02:
        # a cell's position must steer attention from the first steps, or words like "top left"
        # find nothing to attend to (demo, 9 minutes: validation VQA 0.62-0.64 at step 300
        # against 0.54-0.59 with 0.02).
        nn.init.trunc_normal_(self.pos, std=0.5)
        self.stack = Stack.of(cfg.image, depth=cfg.conv_attention_layers, dropout=cfg.dropout)
        self.flatten_pool = nn.Linear(side * side * width, width) if cfg.conv_pool == "flatten" else None

    def forward(self, image: torch.Tensor, keep: torch.Tensor | None = None) -> Encoded:
        if keep is not None:
            raise ValueError("the convolutional image encoder does not support patch masking")
        x = self.stack(
            self.blocks(self.stem(image.to(self.stem[0].weight.dtype))).flatten(2).transpose(1, 2) + self.pos
        )
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return Encoded(x, mask, self.pool(x))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, cells, W) -> (B, W): a mean forgets which cell held what; `flatten` keeps it."""
        return self.flatten_pool(tokens.flatten(1)) if self.flatten_pool is not None else tokens.mean(dim=1)


def hz_to_mel(f):
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filters(
    sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None
) -> torch.Tensor:
    """(n_fft//2+1, n_mels) triangular HTK mel filterbank (librosa's htk=True, norm=None)."""
    f_max = f_max or sample_rate / 2
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    points = mel_to_hz(
        torch.linspace(
            hz_to_mel(torch.tensor(f_min, dtype=torch.float64)),
            hz_to_mel(torch.tensor(f_max, dtype=torch.float64)),
            n_mels + 2,
            dtype=torch.float64,
        )
    )
    widths = points[1:] - points[:-1]
    slopes = points[None, :] - freqs[:, None]  # (n_freqs, n_mels + 2)
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


class LogMel(nn.Module):
    """Log-mel spectrogram without centre padding: frame i covers samples [i*hop, i*hop + n_fft)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_fft, self.hop = cfg.n_fft, cfg.hop_length
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)
        self.register_buffer("filters", mel_filters(cfg.sample_rate, cfg.n_fft, cfg.n_mels), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, n_mels, frames), roughly zero-mean unit-scale."""
        # Always float32: the STFT has no bf16 kernel, and an engine that casts the model to bf16
        # casts these buffers too.
        spec = torch.stft(
            wave.float(), self.n_fft, self.hop, window=self.window.float(), center=False, return_complex=True
        )
        mel = torch.einsum("bft,fm->bmt", spec.abs() ** 2, self.filters.float())
        return (torch.log(mel + 1e-6) + 4.0) / 4.0

    def frame_mask(self, sample_mask: torch.Tensor) -> torch.Tensor:
        """A frame is valid when its whole window lies in the valid (prefix) part of the clip."""
        valid = sample_mask.sum(dim=-1, keepdim=True)
        frames = 1 + (sample_mask.shape[-1] - self.n_fft) // self.hop
        ends = torch.arange(frames, device=sample_mask.device) * self.hop + self.n_fft
        return ends[None, :] <= valid


class AudioEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        t = cfg.audio
        self.width, self.patch_frames, self.max_patches = t.width, cfg.audio_patch_frames, cfg.audio_patches
        self.patch_dim = cfg.n_mels * cfg.audio_patch_frames
        self.mel = LogMel(cfg)
        self.embed = nn.Linear(self.patch_dim, t.width)
        self.cls = nn.Parameter(torch.zeros(1, 1, t.width))
        self.pos = nn.Parameter(torch.zeros(1, 1 + cfg.audio_patches, t.width))
        self.stack = Stack.of(t, dropout=cfg.dropout)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.cls, std=0.02)

    def patchify(self, wave: torch.Tensor, sample_mask: torch.Tensor | None = None):
        """(B, T) -> patches (B, N, n_mels*P) and their validity (B, N)."""
        mel = self.mel(wave)
        n = min(mel.shape[-1] // self.patch_frames, self.max_patches)
        used = n * self.patch_frames
        b, m, _ = mel.shape
        patches = mel[..., :used].reshape(b, m, n, self.patch_frames).permute(0, 2, 1, 3).reshape(b, n, -1)
        if sample_mask is None:
            return patches, torch.ones(b, n, dtype=torch.bool, device=wave.device)
        frames = self.mel.frame_mask(sample_mask)[:, :used].reshape(b, n, self.patch_frames)
        return patches, frames.all(dim=-1)

    def forward(
        self, wave: torch.Tensor, sample_mask: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> Encoded:
        patches, valid = self.patchify(wave, sample_mask)
        x = self.embed(patches.to(self.embed.weight.dtype)) + self.pos[:, 1 : 1 + patches.shape[1]]
        if keep is not None:
            x, valid = gather_patches(x, keep), torch.gather(valid, 1, keep)
        cls = (self.cls + self.pos[:, :1]).expand(x.shape[0], -1, -1)
        mask = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)
        x = self.stack(torch.cat([cls, x], dim=1), mask)
        return Encoded(x, mask, x[:, 0])


def image_encoder(cfg: ModelConfig) -> nn.Module:
    return ViTEncoder(cfg) if cfg.image_encoder == "vit" else ConvEncoder(cfg)
