"""Knowledge distillation (F13): a student learns from a frozen teacher's outputs as well as
from the data. Read top to bottom: the weights, what the teacher gives, the four losses, the
objective that adds them to the student's own task losses.

- similarity: KL between the teacher's and the student's cross-modal similarity distributions
  (each row of a batch's similarity matrix, every modality pair present, both directions), so
  the student learns how the teacher ranks the whole batch, not only the positive pair;
- embedding: the student's embeddings, through a learned projection into the teacher's space,
  matched to the teacher's (cosine), per modality;
- tokens: KL between the teacher's and the student's caption-token distributions (teacher
  forced on the same caption, temperature T, scaled by T^2 as in Hinton et al.);
- answers: the same for the VQA answer classes.

The teacher sees the full context; the student may see less (modality dropout): it learns to
give the teacher's full-context answer from what it has.
"""

from __future__ import annotations

import itertools
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.config import MODALITIES, DistillWeights
from model.objectives import MultiTaskObjective, TaskLoss, combine


class TeacherOutputs(NamedTuple):
    embeddings: dict[str, torch.Tensor]  # modality -> (B, teacher embed_dim), L2-normalised
    scale: torch.Tensor  # the teacher's contrastive temperature (exp of its logit scale)
    caption_logits: torch.Tensor | None  # (B, L-1, vocab) teacher-forced on the clean caption
    answer_logits: torch.Tensor | None  # (B, answers), from question + full context


@torch.inference_mode()
def teacher_outputs(teacher: nn.Module, batch: dict) -> TeacherOutputs:
    """Everything the losses compare against, from one forward pass without gradients."""
    dtype = next(teacher.parameters()).dtype
    batch = {k: v.to(dtype) if v.is_floating_point() and k != "weight" else v for k, v in batch.items()}
    encoded = teacher.encode(batch)
    size = next(iter(encoded.values())).tokens.shape[0]
    device = next(iter(encoded.values())).tokens.device
    present = {m: teacher.present(batch, m, size, device) for m in encoded}
    embeddings = {m: e.float() for m, e in teacher.embed(encoded).items()}
    scale = teacher.logit_scale.clamp(max=4.6052).exp().float()
    context = {m: e for m, e in encoded.items() if m != "text"}
    caption_logits = answer_logits = None
    ids_key = "caption" if "caption_ids" in batch else "text"
    if context and f"{ids_key}_ids" in batch:
        fused = teacher.fuse(context, present)
        ids, mask = batch[f"{ids_key}_ids"], batch[f"{ids_key}_mask"]
        caption_logits = teacher.decode(fused, ids[:, :-1], mask[:, :-1]).float()
    if "question_ids" in batch:  # rows without a question are not scored (the student's `applies`)
        question = teacher.encode_text(batch["question_ids"], batch["question_mask"])
        asked = batch["answer_label"] >= 0
        answer_logits = teacher.answer_logits(teacher.fuse(dict(context, text=question), dict(present, text=asked)))
        answer_logits = answer_logits.float()
    return TeacherOutputs(embeddings, scale, caption_logits, answer_logits)


# -- the losses ------------------------------------------------------------------------------
def similarity_kl(
    student: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    present: dict[str, torch.Tensor],
    student_scale: torch.Tensor,
    teacher_scale: torch.Tensor,
) -> TaskLoss:
    """Per sample: mean over modality pairs and both directions of KL(teacher row || student row)."""
    size = next(iter(student.values())).shape[0]
    device = next(iter(student.values())).device
    total, count = torch.zeros(size, device=device), torch.zeros(size, device=device)
    for a, b in itertools.combinations([m for m in MODALITIES if m in student and m in teacher], 2):
        both = present[a] & present[b]
        rows = both & (both.sum() >= 2)
        # Masks, not a row selection (which waits for the GPU): pairs outside `rows` get a finite
        # floor in both distributions, so they weigh nothing and no row turns NaN.
        pairs = rows[:, None] & rows[None, :]
        floor = torch.finfo(torch.float32).min
        s = (student_scale * student[a].float() @ student[b].float().T).masked_fill(~pairs, floor)
        t = (teacher_scale * teacher[a] @ teacher[b].T).float().masked_fill(~pairs, floor)
        loss = torch.where(rows, (row_kl(s, t) + row_kl(s.T, t.T)) / 2, 0.0)
        total, count = total + loss, count + rows.to(count.dtype)
    return total / count.clamp(min=1), count > 0


def row_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) per row, times T^2."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(-1) * temperature**2


def embedding_match(
    projections: nn.ModuleDict, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], present
) -> TaskLoss:
    """Per sample: mean over its modalities of 1 - cos(projection(student), teacher)."""
    size = next(iter(student.values())).shape[0]
    device = next(iter(student.values())).device
    total, count = torch.zeros(size, device=device), torch.zeros(size, device=device)
    for m in student:
        if m not in teacher:
            continue
        projected = projections[m](student[m]).float()
        distance = 1 - F.cosine_similarity(projected, teacher[m], dim=-1)
        valid = present[m].to(distance.dtype)
        total, count = total + distance * valid, count + valid
    return total / count.clamp(min=1), count > 0


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float):
    """Per sample: KL over the caption's real target tokens, averaged."""
    per_token = row_kl(student_logits.float(), teacher_logits, temperature) * mask
    return per_token.sum(1) / mask.sum(1).clamp(min=1)


# -- the objective ---------------------------------------------------------------------------
class DistillationObjective(nn.Module):
    """The student's task losses plus the distillation losses. An nn.Module because the
    embedding projections train with the student (the training engine finds them here); the
    teacher is held outside the module tree, so it is neither trained, cast, nor partitioned,
    nor saved with the student."""

    def __init__(
        self,
        teacher: nn.Module,
        tasks: MultiTaskObjective,
        weights: DistillWeights,
        student_dim: int,
    ):
        super().__init__()
        self.tasks, self.weights = tasks, weights
        self.__dict__["teacher"] = teacher.eval().requires_grad_(False)  # not a submodule
        teacher_dim = teacher.cfg.embed_dim
        self.projections = nn.ModuleDict({m: nn.Linear(student_dim, teacher_dim, bias=False) for m in MODALITIES})
        self.teacher_seconds = 0.0  # time in the teacher's forward pass: its share of the step

    def forward(self, student: nn.Module, batch: dict, generator: torch.Generator | None = None):
        record: dict = {}
        loss, parts = self.tasks(student, batch, generator, record=record)
        started = time.perf_counter()
        teacher = teacher_outputs(self.teacher, batch)
        self.teacher_seconds += time.perf_counter() - started
        losses = self.losses(student, batch, record, teacher)
        if not losses:
            return loss, parts
        kd_total, kd_parts = combine(losses, self.weights.to_dict(), batch.get("weight"))
        parts = parts | {f"kd_{k}": v for k, v in kd_parts.items() if k != "total"}
        parts["total"] = (loss + kd_total).detach()
        return loss + kd_total, parts

    def losses(self, student, batch: dict, record: dict, teacher: TeacherOutputs) -> dict[str, TaskLoss]:
        w, out = self.weights, {}
        embeddings, present = record["embeddings"], record["present"]
        if w.similarity:
            scale = student.logit_scale.clamp(max=4.6052).exp().float()
            out["similarity"] = similarity_kl(embeddings, teacher.embeddings, present, scale, teacher.scale)
        if w.embedding:
            out["embedding"] = embedding_match(self.projections, embeddings, teacher.embeddings, present)
        if w.tokens and teacher.caption_logits is not None and "caption_logits" in record:
            student_logits, target_mask, applies = record["caption_logits"]
            out["tokens"] = (token_kl(student_logits, teacher.caption_logits, target_mask, w.temperature), applies)
        if w.answers and teacher.answer_logits is not None and "answer_logits" in record:
            student_logits, applies = record["answer_logits"]
            out["answers"] = (row_kl(student_logits.float(), teacher.answer_logits, w.temperature), applies)
        return out
