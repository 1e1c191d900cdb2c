"""CrossModalModel: encoders, alignment layer, fusion, heads. Read this file top to bottom.

A batch is a dict of tensors; every modality is optional, per batch (key absent) and per
sample (`has_<modality>` False):

    text_ids, text_mask       (B, L) long / bool    caption or transcript (maybe augmented)
    caption_ids, caption_mask                       the clean caption, target of captioning
    negative_ids, negative_mask                     hard negative caption (training; no <bos> = none)
    question_ids, question_mask                     VQA question (read by the text encoder)
    answer_ids, answer_mask                         free-form answer (decoder target)
    answer_label              (B,) long, -100 = none   VQA class
    image                     (B, 3, H, W) float, normalised
    audio, audio_mask         (B, T) float waveform at the model rate / bool validity
    has_text, has_image, has_audio   (B,) bool
    weight                    (B,) float per-sample loss weight (modality balancing)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import MODALITIES, ModelConfig
from model.decoder import CaptionDecoder
from model.encoders import AudioEncoder, Encoded, TextEncoder, image_encoder
from model.fusion import Fused, Fusion
from model.heads import AnswerHead, MaskedTokenHead, MatchingHead, PatchReconstructionHead
from model.layers import init_weights
from model.tokenizer import PAD


class CrossModalModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoders = nn.ModuleDict(
            {"text": TextEncoder(cfg), "image": image_encoder(cfg), "audio": AudioEncoder(cfg)}
        )
        width = cfg.fusion_tower.width
        # The alignment layer (F1): every modality projected into one shared embedding space.
        self.align = nn.ModuleDict({m: nn.Linear(e.width, cfg.embed_dim, bias=False) for m, e in self.encoders.items()})
        self.to_fusion = nn.ModuleDict({m: nn.Linear(e.width, width) for m, e in self.encoders.items()})
        # Shape [1], not a scalar: DeepSpeed's bf16 optimizer cannot flatten 0-dim parameters.
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))
        self.fusion = Fusion(cfg)
        self.decoder = CaptionDecoder(cfg)
        self.matching_head = MatchingHead(width)
        self.answer_head = AnswerHead(width, cfg.num_answers)
        self.masked_text_head = MaskedTokenHead(width, cfg.vocab_size)
        self.image_reconstruction = (
            PatchReconstructionHead(
                cfg.image.width, cfg.image.heads, cfg.image_patches, self.encoders["image"].patch_dim, cfg.image
            )
            if cfg.image_encoder == "vit"
            else None
        )
        self.audio_reconstruction = PatchReconstructionHead(
            cfg.audio.width, cfg.audio.heads, cfg.audio_patches, self.encoders["audio"].patch_dim, cfg.audio
        )
        init_weights(self)
        # The fusion stream starts from these projections, so they get unit gain (LeCun normal),
        # not the 0.02 of the other Linears: at 0.02 the encoders' signal entered the stream at a
        # quarter of unit scale, the joint blocks' own outputs soon outgrew it, and a cue that
        # was not already strong (a shape's kind) never reached the decoder or the VQA head:
        # kinds were captioned at chance after 400 steps while a probe on the same encoder
        # learnt them in 100. With unit gain the decoder learnt kinds from audio in 150 steps.
        for projection in self.to_fusion.values():
            nn.init.normal_(projection.weight, std=projection.in_features**-0.5)
        self.decoder.tie_weights()

    # -- unimodal ------------------------------------------------------------------------------
    def encode_text(self, ids, mask) -> Encoded:
        return self.encoders["text"](ids, mask)

    def encode_texts(self, texts: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Encoded]:
        """Several (ids, mask) sets through the text encoder in one call: rows stacked, each set
        padded to the longest and trimmed back. The same outputs as a call each (padded keys are
        masked, the pooled vector sits at <bos>), with one set of kernel launches: a GPU step
        of this model is bound by the host's launches, not by the GPU."""
        if len(texts) <= 1:
            return [self.encode_text(*text) for text in texts]
        longest = max(ids.shape[1] for ids, _ in texts)
        ids = torch.cat([F.pad(ids, (0, longest - ids.shape[1]), value=PAD) for ids, _ in texts])
        mask = torch.cat([F.pad(mask, (0, longest - mask.shape[1]), value=False) for _, mask in texts])
        joint, out, start = self.encode_text(ids, mask), [], 0
        for ids, mask in texts:
            rows = slice(start, start + ids.shape[0])
            out.append(Encoded(joint.tokens[rows, : ids.shape[1]], mask, joint.pooled[rows]))
            start += ids.shape[0]
        return out

    def encode(self, batch: dict, text: str | None = "text") -> dict[str, Encoded]:
        """Encoder outputs of every modality the batch carries (`text` picks which text field;
        None: no text)."""
        encoded = {}
        if text is not None and f"{text}_ids" in batch:
            encoded["text"] = self.encode_text(batch[f"{text}_ids"], batch[f"{text}_mask"])
        if "image" in batch:
            encoded["image"] = self.encoders["image"](batch["image"])
        if "audio" in batch:
            encoded["audio"] = self.encoders["audio"](batch["audio"], batch.get("audio_mask"))
        return encoded

    def embed(self, encoded: dict[str, Encoded]) -> dict[str, torch.Tensor]:
        """L2-normalised embeddings in the shared space, per modality."""
        return {m: F.normalize(self.align[m](e.pooled), dim=-1) for m, e in encoded.items()}

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Contrastive retrieval scores: temperature-scaled cosine similarity (B_a, B_b)."""
        return self.logit_scale.clamp(max=math.log(100.0)).exp() * a @ b.T

    @staticmethod
    def present(batch: dict, modality: str, size: int, device) -> torch.Tensor:
        flag = batch.get(f"has_{modality}")
        return flag.bool() if flag is not None else torch.ones(size, dtype=torch.bool, device=device)

    # -- fused -------------------------------------------------------------------------------
    def fuse(self, encoded: dict[str, Encoded], present: dict[str, torch.Tensor]) -> Fused:
        """Fusion over the given modalities; samples where one is not `present` ignore it."""
        inputs = {}
        for m in MODALITIES:
            if m in encoded:
                e = encoded[m]
                inputs[m] = Encoded(
                    self.to_fusion[m](e.tokens), e.mask & present[m][:, None], self.to_fusion[m](e.pooled)
                )
        return self.fusion(inputs)

    def fuse_together(self, variants: list[tuple[dict[str, Encoded], dict[str, torch.Tensor]]]) -> list[Fused]:
        """`fuse` of several (encoded, present) sets of the same modalities and shapes in one
        call, rows stacked (as `encode_texts`: the same outputs, one set of kernel launches)."""
        if len(variants) <= 1:
            return [self.fuse(*variant) for variant in variants]
        first, size = variants[0][0], next(iter(variants[0][0].values())).tokens.shape[0]
        encoded = {m: Encoded(*(torch.cat([v[0][m][i] for v in variants]) for i in range(3))) for m in first}
        present = {m: torch.cat([v[1][m] for v in variants]) for m in variants[0][1]}
        fused = self.fuse(encoded, present)
        return [
            Fused(fused.tokens[rows], fused.mask[rows], fused.pooled[rows], fused.spans)
            for rows in (slice(i * size, (i + 1) * size) for i in range(len(variants)))
        ]

    def match_logits(self, fused: Fused) -> torch.Tensor:
        return self.matching_head(fused.pooled)

    def answer_logits(self, fused: Fused) -> torch.Tensor:
        return self.answer_head(fused.pooled)

    def decode(self, fused: Fused, ids, mask) -> torch.Tensor:
        return self.decoder(ids, mask, fused.tokens, fused.mask)

    @torch.no_grad()
    def generate(self, fused: Fused, max_len: int = 32, beam_size: int = 1, length_penalty: float = 0.0):
        return self.decoder.generate(fused.tokens, fused.mask, max_len, beam_size, length_penalty)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Embeddings of every modality present, plus fused pooled features (for export and probes)."""
        encoded = self.encode(batch)
        size = next(iter(encoded.values())).tokens.shape[0]
        device = next(iter(encoded.values())).tokens.device
        present = {m: self.present(batch, m, size, device) for m in encoded}
        out = {f"{m}_embedding": v for m, v in self.embed(encoded).items()}
        out["fused"] = self.fuse(encoded, present).pooled
        return out


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level component, and the total (tied weights counted once)."""
    counts = {}
    for name, child in model.named_children():
        counts[name] = sum(p.numel() for p in {id(p): p for p in child.parameters()}.values())
    counts["total"] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return counts
