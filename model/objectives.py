"""Pre-training and fine-tuning objectives (F6, F7, F8) as plain functions, and their combiner.

Every task returns a per-sample loss and which samples it applies to, so the combiner can
apply the per-sample modality weights from balancing: task = sum(w*l*valid) / sum(w*valid),
total = sum over tasks of task weight * task loss.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from model.config import LossWeights
from model.encoders import Encoded
from model.fusion import Fused
from model.heads import random_keep
from model.tokenizer import MASK, PAD

TaskLoss = tuple[torch.Tensor, torch.Tensor]  # (per-sample loss (B,), applies (B,) bool)


# -- contrastive -----------------------------------------------------------------------------
def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    b_negatives: torch.Tensor | None = None,
    negative_weight: float = 1.0,
    rows: torch.Tensor | None = None,
    negatives_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric CLIP loss per row: matched rows are the positives, all others negatives.
    `b_negatives` are extra candidates of b's modality for the a->b direction only (hard
    negative captions: they have no partner to be retrieved by), each counted `negative_weight`
    times (a log-weight on its logit). `rows` (bool): only these rows take part, as candidates
    and as queries (the others' losses are 0); `negatives_valid` (bool): which negatives are real.
    Masks, not indexing: a row subset chosen on the host would wait for the GPU (model.syncs)."""
    logits = (scale * a @ b.T).float()  # losses in float32 whatever the weights' dtype
    target = torch.arange(a.shape[0], device=a.device)
    if rows is not None:  # a finite floor, not -inf: a row with no candidate left stays NaN-free
        logits = logits.masked_fill(~(rows[:, None] & rows[None, :]), torch.finfo(logits.dtype).min)
    a_to_b = logits
    if b_negatives is not None:
        hard = (scale * a @ b_negatives.T).float() + math.log(negative_weight)
        if negatives_valid is not None:
            hard = hard.masked_fill(~negatives_valid[None, :], torch.finfo(hard.dtype).min)
        a_to_b = torch.cat([logits, hard], dim=1)
    loss = (F.cross_entropy(a_to_b, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")) / 2
    return loss if rows is None else torch.where(rows, loss, 0.0)


def contrastive(
    model,
    embeddings: dict[str, torch.Tensor],
    present: dict[str, torch.Tensor],
    text_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
    negative_weight: float = 1.0,
) -> TaskLoss:
    """Mean InfoNCE over every pair of modalities, on the samples that have both (a pair two
    samples or more share). Hard negative captions (`text_negatives`: embedded, and which are
    real) join the texts every image and audio is scored against."""
    size = next(iter(embeddings.values())).shape[0]
    device = next(iter(embeddings.values())).device
    total, count = torch.zeros(size, device=device), torch.zeros(size, device=device)
    scale = model.logit_scale.clamp(max=4.6052).exp()
    for m1, m2 in itertools.combinations(embeddings, 2):
        both = present[m1] & present[m2]
        rows = both & (both.sum() >= 2)  # one sample alone has nothing to be contrasted with
        if "text" in (m1, m2):  # text as b, so the negatives are candidates for the other modality
            other = m2 if m1 == "text" else m1
            negatives, real = text_negatives if text_negatives is not None else (None, None)
            loss = info_nce(embeddings[other], embeddings["text"], scale, negatives, negative_weight, rows, real)
        else:
            loss = info_nce(embeddings[m1], embeddings[m2], scale, rows=rows)
        total, count = total + loss, count + rows.to(count.dtype)
    return total / count.clamp(min=1), count > 0


def embed_negatives(model, negatives: Encoded, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the batch's hard negative captions, and which rows hold one (a row without
    one, no <bos>, is encoded too and never scored: choosing rows would wait for the GPU)."""
    return model.embed({"text": negatives})["text"], batch["negative_mask"][:, 0]


# -- fused tasks -----------------------------------------------------------------------------
def hard_negatives(embeddings, present, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, another sample's index drawn by similarity of its text to this sample's
    image (or audio when the image is absent): the confusable texts ALBEF trains on.
    Returns (index, found): `found` is False where no other sample has a text to offer."""
    text = embeddings["text"]
    other = embeddings.get("image", embeddings.get("audio"))
    if "image" in embeddings and "audio" in embeddings:
        other = torch.where(present["image"][:, None], embeddings["image"], embeddings["audio"])
    with torch.no_grad():
        weights = (other @ text.T * 10).softmax(dim=1) + 1e-6
        weights.fill_diagonal_(0)
        weights *= present["text"][None, :].float()
        found = weights.sum(dim=1) > 0
        weights = weights.masked_fill(~found[:, None], 1.0)  # any row, so one can be drawn; not scored
        # One draw per row in proportion to the weights: multinomial's own method (the exponential
        # race), without its input check, which reads the GPU back (model.syncs).
        race = torch.empty_like(weights).exponential_(1, generator=generator)
        return (weights / race).argmax(dim=1), found


def matching_inputs(encoded, embeddings, present, context_present, generator):
    """The fusion inputs of text-context matching, (encoded, present) each: every sample's own
    text (a positive), and the text of its hard negative (a negative); and which samples are
    scored. None when there is nothing to match."""
    if "text" not in encoded or len(encoded) < 2 or encoded["text"].tokens.shape[0] < 2:
        return None
    negative, found = hard_negatives(embeddings, present, generator)
    t = encoded["text"]
    swapped = dict(encoded, text=Encoded(t.tokens[negative], t.mask[negative], t.pooled[negative]))
    has_context = torch.stack([context_present[m] for m in encoded if m != "text"]).any(dim=0)
    return (
        (encoded, dict(context_present, text=present["text"])),
        (swapped, dict(context_present, text=present["text"][negative])),
        present["text"] & has_context & found,
    )


def matching_loss(model, positive: Fused, negative: Fused) -> torch.Tensor:
    """Positive pairs are labelled 1, each text swapped for its hard negative 0."""
    pos_logits, neg_logits = model.match_logits(positive).float(), model.match_logits(negative).float()
    ones = torch.ones(pos_logits.shape[0], dtype=torch.long, device=pos_logits.device)
    return (
        F.cross_entropy(pos_logits, ones, reduction="none") + F.cross_entropy(neg_logits, 1 - ones, reduction="none")
    ) / 2


def mask_tokens(ids: torch.Tensor, mask: torch.Tensor, ratio: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace ~ratio of the real tokens (never <bos>/<eos>, at least one) with <mask>."""
    maskable = mask.clone()
    maskable[:, 0] = False
    maskable &= ids != PAD
    lengths = mask.sum(dim=1)
    maskable[torch.arange(ids.shape[0]), (lengths - 1).clamp(min=0)] = False  # <eos>
    scores = torch.rand(ids.shape, generator=generator, device=ids.device) * maskable
    chosen = (scores > 1 - ratio) & maskable
    # At least one per sample that has anything maskable: its highest-scoring token.
    first = scores.argmax(dim=1)
    chosen[torch.arange(ids.shape[0]), first] |= maskable[torch.arange(ids.shape[0]), first]
    return torch.where(chosen, torch.full_like(ids, MASK), ids), chosen


def masked_text_loss(model, fused: Fused, ids: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked tokens (`chosen`) predicted from the fused text positions."""
    logits = model.masked_text_head(fused.tokens[:, fused.spans["text"]]).float()
    per_token = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none") * chosen
    return per_token.sum(1) / chosen.sum(1).clamp(min=1)


def masked_patches(head, patches: torch.Tensor, valid: torch.Tensor, run_encoder, ratio, generator) -> torch.Tensor:
    """MAE: encode a random subset of patches, reconstruct the hidden ones (normalised targets)."""
    batch, total, _ = patches.shape
    patches = patches.float()
    keep = random_keep(batch, total, max(1, int(round(total * (1 - ratio)))), generator, patches.device)
    visible = run_encoder(keep).tokens[:, 1:]  # drop [cls]
    predicted = head(visible, keep, total)
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    hidden = torch.ones(batch, total, dtype=torch.bool, device=patches.device).scatter(1, keep, False) & valid
    per_patch = ((predicted.float() - target.float()) ** 2).mean(-1) * hidden
    return per_patch.sum(1) / hidden.sum(1).clamp(min=1)


def masked_image(model, batch, present, ratio, generator) -> TaskLoss:
    vit = model.encoders["image"]
    patches = vit.patchify(batch["image"])
    valid = torch.ones(patches.shape[:2], dtype=torch.bool, device=patches.device)
    loss = masked_patches(
        model.image_reconstruction, patches, valid, lambda keep: vit(batch["image"], keep=keep), ratio, generator
    )
    return loss, present["image"]


def masked_audio(model, batch, present, ratio, generator) -> TaskLoss:
    enc = model.encoders["audio"]
    patches, valid = enc.patchify(batch["audio"], batch.get("audio_mask"))
    loss = masked_patches(
        model.audio_reconstruction,
        patches.detach(),
        valid,
        lambda keep: enc(batch["audio"], batch.get("audio_mask"), keep=keep),
        ratio,
        generator,
    )
    return loss, present["audio"]


def generation(model, fused, ids, mask, record: dict | None = None, key: str = "") -> torch.Tensor:
    """Teacher-forced cross-entropy of ids[1:] given ids[:-1], per sample. `record` (with a
    `key`) keeps the logits and target mask for losses that compare them (distillation)."""
    logits = model.decode(fused, ids[:, :-1], mask[:, :-1])
    per_token = F.cross_entropy(logits.transpose(1, 2).float(), ids[:, 1:], reduction="none") * mask[:, 1:]
    if record is not None:
        record[key] = (logits, mask[:, 1:].to(per_token.dtype))
    return per_token.sum(1) / mask[:, 1:].sum(1).clamp(min=1)


def caption(model, batch, encoded, present, context_present, record: dict | None = None) -> TaskLoss:
    context = {m: e for m, e in encoded.items() if m != "text"}
    if not context:
        return _none(encoded)
    fused = model.fuse(context, context_present)
    has_context = torch.stack([context_present[m] for m in context]).any(dim=0)
    # The clean caption when the batch has one: the encoder may read an augmented text, but the
    # decoder must learn to write the true one.
    ids, mask = (
        (batch["caption_ids"], batch["caption_mask"])
        if "caption_ids" in batch
        else (batch["text_ids"], batch["text_mask"])
    )
    applies = present["text"] & has_context
    loss = generation(model, fused, ids, mask, record, "caption_logits")
    if record is not None:  # (logits, target mask, applies)
        record["caption_logits"] = (*record["caption_logits"], applies)
    return loss, applies


def question_answering(
    model, batch, encoded, question: Encoded, context_present, record: dict | None = None
) -> tuple[TaskLoss, TaskLoss]:
    """(answer-class loss, free-form answer loss) from the encoded question + image/audio."""
    context = {m: e for m, e in encoded.items() if m != "text"}
    labels = batch["answer_label"]
    asked = labels >= 0
    fused = model.fuse(dict(context, text=question), dict(context_present, text=asked))
    logits = model.answer_logits(fused)
    vqa = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    has_context = torch.stack([context_present[m] for m in context]).any(dim=0) if context else asked
    applies = asked & has_context
    if record is not None:
        record["answer_logits"] = (logits, applies)
    if "answer_ids" not in batch:
        return (vqa, applies), (torch.zeros_like(vqa), torch.zeros_like(applies))
    return (vqa, applies), (generation(model, fused, batch["answer_ids"], batch["answer_mask"]), applies)


def drop_modalities(present: dict[str, torch.Tensor], rate: float, generator) -> dict[str, torch.Tensor]:
    """Modality dropout (F8): hide each present context modality with probability `rate`,
    never all of a sample's context modalities at once."""
    names = [m for m in present if m != "text"]
    if rate <= 0 or len(names) < 2:
        return dict(present)
    device = present[names[0]].device
    kept = {m: present[m] & (torch.rand(present[m].shape, generator=generator, device=device) >= rate) for m in names}
    nothing_left = ~torch.stack(list(kept.values())).any(dim=0)
    for m in names:  # restore the originals where dropout would have left nothing
        kept[m] = torch.where(nothing_left, present[m], kept[m])
    return dict(present, **kept)


def _none(encoded) -> TaskLoss:
    any_e = next(iter(encoded.values()))
    size, device = any_e.tokens.shape[0], any_e.tokens.device
    return torch.zeros(size, device=device), torch.zeros(size, dtype=torch.bool, device=device)


# -- the multi-task combiner -------------------------------------------------------------------
class MultiTaskObjective:
    """All objectives of one training step, weighted by task and by sample (F7)."""

    def __init__(self, weights: LossWeights = LossWeights(), modality_dropout: float | None = None):
        # None: the model config's rate (ModelConfig.modality_dropout).
        self.weights, self.modality_dropout = weights, modality_dropout

    def __call__(
        self, model, batch: dict, generator: torch.Generator | None = None, record: dict | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`record`, when given, receives what a distillation loss compares: the embeddings and
        presence flags, the caption logits and the answer logits of this step."""
        w = self.weights
        texts = self.texts(batch, generator)
        encoded_texts = dict(zip(texts, model.encode_texts([(ids, mask) for ids, mask, _ in texts.values()])))
        encoded = model.encode(batch, text=None)
        if "text" in encoded_texts:  # text first: the modalities in their usual order
            encoded = {"text": encoded_texts["text"], **encoded}
        any_e = next(iter(encoded.values()))
        size, device = any_e.tokens.shape[0], any_e.tokens.device
        present = {m: model.present(batch, m, size, device) for m in encoded}
        rate = model.cfg.modality_dropout if self.modality_dropout is None else self.modality_dropout
        context_present = drop_modalities(present, rate if model.training else 0.0, generator)
        embeddings = model.embed(encoded)
        if record is not None:
            record |= {"embeddings": embeddings, "present": present}
        tasks: dict[str, TaskLoss] = {}
        if w.contrastive:
            negatives = embed_negatives(model, encoded_texts["negative"], batch) if "negative" in texts else None
            tasks["contrastive"] = contrastive(model, embeddings, present, negatives, w.hard_negative_weight)
        tasks |= self.text_fusion_tasks(
            model, encoded, encoded_texts, texts, embeddings, present, context_present, generator
        )
        if w.masked_image and "image" in encoded and model.image_reconstruction is not None:
            tasks["masked_image"] = masked_image(model, batch, present, w.patch_mask_ratio, generator)
        if w.masked_audio and "audio" in encoded:
            tasks["masked_audio"] = masked_audio(model, batch, present, w.patch_mask_ratio, generator)
        if w.caption and "text" in encoded:
            tasks["caption"] = caption(model, batch, encoded, present, context_present, record)
        if "question" in texts:
            question = encoded_texts["question"]
            tasks["vqa"], tasks["answer"] = question_answering(model, batch, encoded, question, context_present, record)
        return combine(tasks, w.to_dict(), batch.get("weight"))

    def texts(self, batch: dict, generator) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Every text the step encodes, (ids, mask, masked positions or None) by name: the text,
        its masked copy, the hard negative captions, the question. They go through the text
        encoder in one call (`encode_texts`)."""
        w, texts = self.weights, {}
        if "text_ids" in batch:
            ids, mask = batch["text_ids"], batch["text_mask"]
            texts["text"] = (ids, mask, None)
            if w.masked_text:
                masked_ids, chosen = mask_tokens(ids, mask, w.text_mask_ratio, generator)
                texts["masked"] = (masked_ids, mask, chosen)
            if w.contrastive and "negative_ids" in batch:
                texts["negative"] = (batch["negative_ids"], batch["negative_mask"], None)
        if (w.vqa or w.answer) and "question_ids" in batch:
            texts["question"] = (batch["question_ids"], batch["question_mask"], None)
        return texts

    def text_fusion_tasks(
        self, model, encoded, encoded_texts, texts, embeddings, present, context_present, generator
    ) -> dict[str, TaskLoss]:
        """Matching (positive and negative texts) and masked text: three fusions over inputs of
        the same shapes, run as one (`fuse_together`)."""
        w, tasks, variants = self.weights, {}, []
        matched = None
        if w.matching and "text" in encoded:
            matched = matching_inputs(encoded, embeddings, present, context_present, generator)
            if matched is None:
                tasks["matching"] = _none(encoded)
            else:
                variants += matched[:2]
        if "masked" in texts:  # a masked copy exists only where the batch has text
            variants.append((dict(encoded, text=encoded_texts["masked"]), dict(context_present, text=present["text"])))
        fused = model.fuse_together(variants)
        if matched is not None:
            tasks["matching"] = (matching_loss(model, fused[0], fused[1]), matched[2])
        if "masked" in texts:
            chosen = texts["masked"][2]
            loss = masked_text_loss(model, fused[-1], texts["text"][0], chosen)
            tasks["masked_text"] = (loss, present["text"] & chosen.any(dim=1))
        return tasks


def combine(
    tasks: dict[str, TaskLoss], task_weights: dict[str, float], sample_weights
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total loss, each task's loss as a detached 0-dim tensor: NaN where no sample applied).

    Nothing here reads a value back to the host (on a GPU that would stop it queueing work
    ahead): a batch no task applies to gives a total of 0 and every task NaN, which
    `nothing_applies` tells the caller when it reads the losses anyway."""
    total, parts = None, {}
    for name, (loss, applies) in tasks.items():
        if not task_weights.get(name):
            continue
        weights = applies.to(loss.dtype) * (sample_weights.to(loss.dtype) if sample_weights is not None else 1.0)
        weight_sum = weights.sum()
        task = (loss * weights).sum() / weight_sum.clamp(min=torch.finfo(weight_sum.dtype).tiny)
        parts[name] = torch.where(weight_sum > 0, task, torch.nan).detach()
        total = task_weights[name] * task if total is None else total + task_weights[name] * task
    if total is None:
        raise ValueError("no objective is weighted for this batch (every loss weight of its tasks is 0)")
    parts["total"] = total.detach()
    return total, parts


def nothing_applies(parts: dict[str, float]) -> bool:
    """True when no task of a step applied to any sample (its losses, read back: all NaN)."""
    tasks = [value for name, value in parts.items() if not name.endswith("total")]
    return all(value != value for value in tasks)
