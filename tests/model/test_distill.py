"""Distillation: the losses are zero where the student already agrees with the teacher, the
teacher stays outside the trained module, and a distilled student ends closer to its teacher
on held-out samples than the same student trained on the data alone for the same steps."""

from __future__ import annotations

import pytest
import torch

from model.config import DistillWeights, LossWeights, model_config
from model.distill import DistillationObjective, row_kl, similarity_kl, teacher_outputs
from model.multimodal import CrossModalModel
from model.objectives import MultiTaskObjective
from tests.model.demo_data import batch_of, memorise, world_for

WEIGHTS = LossWeights(matching=0, masked_text=0, masked_image=0, masked_audio=0, answer=0)


def student_config(tokenizer):
    return model_config(
        "tiny",
        vocab_size=tokenizer.vocab_size,
        embed_dim=32,
        text={"width": 32, "depth": 1, "heads": 2},
        image={"width": 32, "depth": 2, "heads": 2},
        audio={"width": 32, "depth": 1, "heads": 2},
        fusion_tower={"width": 32, "depth": 1, "heads": 2},
        decoder={"width": 32, "depth": 1, "heads": 2},
    )


def test_row_kl_is_zero_for_equal_rows_and_positive_otherwise():
    logits = torch.randn(4, 6)
    assert row_kl(logits, logits).abs().max() < 1e-6
    assert (row_kl(torch.randn(4, 6), logits) > 0).all()


def test_similarity_kl_ignores_the_scale_free_part_and_absent_samples():
    teacher = {m: torch.nn.functional.normalize(torch.randn(5, 8), dim=-1) for m in ("text", "image")}
    present = {"text": torch.ones(5, dtype=torch.bool), "image": torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool)}
    scale = torch.tensor(10.0)
    loss, applies = similarity_kl(teacher, teacher, present, scale, scale)
    assert applies.tolist() == [True, True, True, False, True]
    assert loss.abs().max() < 1e-5


def test_the_teacher_is_not_a_parameter_of_the_objective(tokenizer, tiny_cfg):
    teacher = CrossModalModel(tiny_cfg)
    objective = DistillationObjective(teacher, MultiTaskObjective(WEIGHTS), DistillWeights(), student_dim=32)
    owned = {id(p) for p in objective.parameters()}
    assert not owned & {id(p) for p in teacher.parameters()}
    assert set(dict(objective.named_parameters())) == {f"projections.{m}.weight" for m in ("text", "image", "audio")}


def mean_similarity_kl(student, teacher, batch) -> float:
    target = teacher_outputs(teacher, batch)
    with torch.no_grad():
        encoded = student.encode(batch)
        size = batch["weight"].shape[0]
        present = {m: student.present(batch, m, size, "cpu") for m in encoded}
        scale = student.logit_scale.exp()
        loss, applies = similarity_kl(student.embed(encoded), target.embeddings, present, scale, target.scale)
    return float(loss[applies].mean())


@pytest.mark.slow
def test_a_distilled_student_is_closer_to_its_teacher_on_held_out_data(tokenizer, tiny_cfg):
    world = world_for(tiny_cfg)
    # The teacher learns from other samples than the students: on what it memorised its
    # similarities are one-hot, the task's own labels, and would teach nothing more.
    teaching, train = (
        batch_of(world, range(16), tokenizer, tiny_cfg),
        batch_of(world, range(100, 116), tokenizer, tiny_cfg),
    )
    held_out = batch_of(world, range(1000, 1016), tokenizer, tiny_cfg)
    teacher = CrossModalModel(tiny_cfg)
    memorise(teacher, teaching, MultiTaskObjective(WEIGHTS), steps=30)
    teacher.eval()
    student_cfg = student_config(tokenizer)
    torch.manual_seed(1)
    plain = CrossModalModel(student_cfg)
    distilled = CrossModalModel(student_cfg)
    distilled.load_state_dict(plain.state_dict())  # the same start
    memorise(plain, train, MultiTaskObjective(WEIGHTS), steps=30)
    objective = DistillationObjective(teacher, MultiTaskObjective(WEIGHTS), DistillWeights(), student_cfg.embed_dim)
    wrapped = torch.nn.ModuleDict({"student": distilled, "objective": objective})  # projections train too
    memorise(wrapped, train, lambda module, batch: module["objective"](module["student"], batch), steps=30)
    kl_plain = mean_similarity_kl(plain, teacher, held_out)
    kl_distilled = mean_similarity_kl(distilled, teacher, held_out)
    # Measured: 0.94 distilled against 1.89 without the teacher (0.93 for both at the start).
    assert kl_distilled < 0.7 * kl_plain, (kl_distilled, kl_plain)
    assert objective.teacher_seconds > 0


def test_similarity_kl_on_the_rows_that_have_both_equals_the_kl_of_those_rows_alone():
    g = torch.Generator().manual_seed(0)
    student = {m: torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1) for m in ("text", "image")}
    teacher = {m: torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1) for m in ("text", "image")}
    present = {"text": torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool), "image": torch.ones(6, dtype=torch.bool)}
    present["image"][4] = False
    s_scale, t_scale = torch.tensor(5.0), torch.tensor(10.0)
    loss, applies = similarity_kl(student, teacher, present, s_scale, t_scale)
    rows = torch.tensor([0, 1, 3, 5])
    s = s_scale * student["text"][rows] @ student["image"][rows].T
    t = t_scale * teacher["text"][rows] @ teacher["image"][rows].T
    alone = (row_kl(s, t) + row_kl(s.T, t.T)) / 2
    assert applies.tolist() == [True, True, False, True, False, True]
    assert torch.allclose(loss[rows], alone, atol=1e-6) and loss[~applies].abs().max() == 0


def test_a_distillation_step_never_makes_the_host_wait_for_the_device(tokenizer, tiny_cfg, demo_batch):
    from model.syncs import HostSyncs

    teacher, student = CrossModalModel(tiny_cfg), CrossModalModel(tiny_cfg)
    objective = DistillationObjective(teacher, MultiTaskObjective(WEIGHTS), DistillWeights(), tiny_cfg.embed_dim)
    with HostSyncs() as syncs:
        loss, parts = objective(student, demo_batch, torch.Generator().manual_seed(0))
        loss.backward()
    assert syncs.count == 0, dict(syncs.sites)
    assert torch.isfinite(loss) and {"kd_similarity", "kd_answers"} <= set(parts)
