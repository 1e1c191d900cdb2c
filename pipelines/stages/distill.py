"""Distill: a small student learns from the frozen trained teacher (F13), on Ray Train with
DeepSpeed through the train stage's loop: the teacher is one more thing the loop is given
(`model.distill.DistillationObjective`), with the same checkpoints, recovery and logging.

The student is `distill.model` (the demo: the `tiny` size with the convolutional image
tower) at the data's sizes, with the teacher's tokenizer and answer vocabulary. It is scored
with the evaluate stage's code on the same split, and measured (parameters, size on disk, CPU
latency at batch 1 and 32, peak memory) beside the teacher.
"""

from __future__ import annotations

from model.io import SavedModel
from model.multimodal import CrossModalModel, parameter_counts
from pipelines.config.compress import DistillConfig
from pipelines.config.train import model_config_for
from pipelines.dag import StageContext, StageError, StageResult
from pipelines.stages.compressed import describe, figures_of, load_uri, logged_metric, model_result, stage_model
from pipelines.stages.models import check_micro_batch, prepared_spec, store_model
from pipelines.training.ray_fit import fit


def distill(cfg: DistillConfig, ctx: StageContext) -> StageResult:
    spec = prepared_spec(ctx)
    check_micro_batch(cfg, spec, "distill")
    teacher_uri = stage_model(cfg.teacher or ctx.inputs["train"].outputs["model"], ctx, "teacher")
    teacher = load_uri(teacher_uri)
    student_cfg = model_config_for(cfg, spec, teacher.tokenizer)
    if (student_cfg.vocab_size, student_cfg.num_answers) != (
        teacher.model.cfg.vocab_size,
        teacher.model.cfg.num_answers,
    ):
        raise StageError(
            f"distill.teacher: its vocabulary ({teacher.model.cfg.vocab_size} tokens, {teacher.model.cfg.num_answers} "
            f"answers) is not the prepared data's ({student_cfg.vocab_size}, {student_cfg.num_answers}): "
            "distil from a teacher trained on this data"
        )
    sizes = parameter_counts(teacher.model)["total"], parameter_counts(CrossModalModel(student_cfg))["total"]
    print(
        f"distill: teacher {sizes[0]:,} parameters -> student {cfg.model.size} {sizes[1]:,} "
        f"({sizes[1] / sizes[0]:.2f}x)"
    )
    fitted = fit(cfg, student_cfg, spec, ctx, teacher=teacher_uri, distill=cfg.kd.weights().to_dict())
    student = CrossModalModel(student_cfg)
    student.load_state_dict(fitted.state)
    saved = SavedModel(
        student.eval(), teacher.tokenizer, teacher.answers, {"run_id": ctx.run_id, "teacher": teacher_uri}
    )
    model_uri = store_model(saved, ctx.output.child("model"))
    share = logged_metric(ctx, "teacher_share")
    figures = {
        "teacher": figures_of(teacher_uri, spec, cfg, scored=False),  # its scores: the evaluate stage's
        "student": figures_of(model_uri, spec, cfg),
    }
    print(describe("distill", figures))
    extra = {"steps": fitted.steps} | ({"teacher_share": share} if share is not None else {})
    return model_result(model_uri, figures, "student", extra)
