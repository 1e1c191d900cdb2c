"""The DeepSpeed set-up: generated config, sync-free clipping, parameter layout, bf16-mixed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from pipelines.config.train import TrainConfig
from pipelines.training.engine import DTYPES, deepspeed_config
from tests.conftest import free_port


def test_the_generated_config_never_syncs_the_device_on_its_own():
    ds = deepspeed_config(TrainConfig(zero_stage=2, precision="bf16"), world_size=2)
    assert ds["timers"]["throughput"]["enabled"] is False  # DeepSpeed's default syncs before every forward
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}
    assert ds["zero_optimization"]["overlap_comm"] is False
    assert "torch_autocast" not in ds


def test_bf16_mixed_keeps_fp32_weights_under_deepspeeds_autocast():
    ds = deepspeed_config(TrainConfig(precision="bf16-mixed"), world_size=1)
    assert ds["bf16"]["enabled"] is False and ds["torch_autocast"]["enabled"] is True
    assert ds["torch_autocast"]["dtype"] == "bfloat16"
    assert DTYPES["bf16-mixed"] == torch.float32  # batches stay fp32: autocast casts per op


def test_deepspeed_overrides_merge_key_by_key():
    cfg = TrainConfig(
        deepspeed={"zero_optimization": {"reduce_bucket_size": 5e8}, "timers": {"throughput": {"enabled": True}}}
    )
    ds = deepspeed_config(cfg, world_size=1)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e8
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["contiguous_gradients"] is True
    assert ds["timers"]["throughput"]["enabled"] is True


def worker(rank: int, out: str, port: int) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from model.config import model_config
    from model.multimodal import CrossModalModel
    from model.synthetic import synthetic_batch
    from pipelines.training.engine import cast_batch, import_deepspeed, initialize

    import_deepspeed().init_distributed(dist_backend="gloo")
    model_cfg = model_config("tiny", num_answers=37)  # an odd-length bias, like base's 3129 answers
    result = {}
    torch.manual_seed(0)
    engine, _ = initialize(CrossModalModel(model_cfg), TrainConfig(zero_stage=2, precision="bf16", micro_batch=4), 1)
    params = list(engine.module.named_parameters())
    result["misaligned"] = [n for n, p in params if p.numel() % 8 == 0 and p.data_ptr() % 16]
    result["odd_sized"] = sum(p.numel() % 8 != 0 for _, p in params)
    torch.manual_seed(0)
    cfg = TrainConfig(zero_stage=2, precision="bf16-mixed", micro_batch=4, lr=3e-3, warmup_steps=0)
    engine, _ = initialize(CrossModalModel(model_cfg), cfg, 1)
    batch = cast_batch(synthetic_batch(model_cfg, 4), DTYPES["bf16-mixed"])
    losses = []
    for _ in range(6):
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    result["losses"] = losses
    result["weight_dtypes"] = sorted({str(p.dtype) for p in engine.module.parameters()})
    result |= distillation_engine(model_cfg, Path(out).parent)
    result |= lora_engine(model_cfg)
    Path(out).write_text(json.dumps(result))


def distillation_engine(teacher_cfg, folder: Path) -> dict:
    """A student engine given a DistillationObjective: what trains, what stays, what is saved."""
    from model.config import DistillWeights, model_config
    from model.distill import DistillationObjective
    from model.multimodal import CrossModalModel
    from model.objectives import MultiTaskObjective
    from model.synthetic import synthetic_batch
    from pipelines.training.engine import consolidate, initialize

    teacher = CrossModalModel(teacher_cfg)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_cfg = model_config("tiny", num_answers=37, embed_dim=32, text={"width": 32, "depth": 1, "heads": 2})
    cfg = TrainConfig(zero_stage=2, precision="fp32", micro_batch=4, warmup_steps=0)
    objective = DistillationObjective(teacher, MultiTaskObjective(cfg.losses.weights()), DistillWeights(), 32)
    projection_before = objective.projections["text"].weight.detach().clone()
    engine, _ = initialize(CrossModalModel(student_cfg), cfg, 1, objective=objective)
    batch = synthetic_batch(student_cfg, 4)
    for _ in range(2):
        loss, parts = engine(batch)
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(folder / "distilled"), tag="step2")
    saved = consolidate(folder / "distilled", 2)
    return {
        "kd_parts": sorted(k for k in parts if k.startswith("kd_")),
        "projection_moved": not torch.equal(objective.projections["text"].weight.detach(), projection_before),
        "teacher_unchanged": all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items()),
        "teacher_seconds": objective.teacher_seconds,
        "saved_keys_outside_model": sorted(k for k in saved if k not in CrossModalModel(student_cfg).state_dict()),
    }


def lora_engine(model_cfg) -> dict:
    """A LoRA-wrapped model through the same engine: the optimizer holds the adapters only."""
    from model.lora import adapted, add_lora
    from model.multimodal import CrossModalModel
    from model.synthetic import synthetic_batch
    from pipelines.training.engine import initialize

    model = adapted(add_lora(CrossModalModel(model_cfg), rank=4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(zero_stage=2, precision="fp32", micro_batch=4, warmup_steps=0)
    given = []  # what initialize hands DeepSpeed (ZeRO then swaps the groups for flat partitions)
    adamw = torch.optim.AdamW

    def recording(groups, **options):  # a real AdamW (DeepSpeed refuses subclasses under ZeRO)
        given.extend(id(p) for group in groups for p in group["params"])
        return adamw(groups, **options)

    torch.optim.AdamW = recording
    try:
        engine, _ = initialize(model, cfg, 1)
    finally:
        torch.optim.AdamW = adamw
    names = {id(p): n for n, p in model.named_parameters()}
    zero = {id(p) for group in engine.optimizer.bit16_groups for p in group}  # the weights ZeRO-2 updates
    batch = synthetic_batch(model_cfg, 4)
    for _ in range(2):
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return {
        "lora_optimized": sorted(names[i] for i in given),
        "lora_zero_updates": sorted(names[i] for i in zero),
        "lora_trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "lora_moved": sorted(moved),
    }


@pytest.mark.spawn
def test_zero2_parameters_start_aligned_bf16_mixed_learns_and_a_teacher_can_be_given(tmp_path):
    out = tmp_path / "result.json"
    mp.spawn(worker, args=(str(out), free_port()), nprocs=1, join=True)
    result = json.loads(out.read_text())
    # Views into DeepSpeed's flat buffer: a bias that starts off a 16-byte boundary made every
    # addmm 7x slower on an H100. The odd-sized ones (there are some) go last.
    assert result["odd_sized"] > 0 and result["misaligned"] == []
    assert result["weight_dtypes"] == ["torch.float32"]
    assert all(map(lambda v: v == v, result["losses"])) and result["losses"][-1] < 0.9 * result["losses"][0]
    # Distillation through the same engine: the projections train, the teacher is untouched,
    # the consolidated checkpoint is the student alone.
    assert result["kd_parts"] == ["kd_answers", "kd_embedding", "kd_similarity", "kd_tokens"]
    assert result["projection_moved"] and result["teacher_unchanged"] and result["teacher_seconds"] > 0
    assert result["saved_keys_outside_model"] == []
    # LoRA: DeepSpeed's optimizer is given the adapters alone, and only they move (lora_A stays
    # until lora_B, which starts at zero, is nonzero: the first step moves lora_B only).
    assert result["lora_optimized"] == result["lora_trainable"] == result["lora_zero_updates"] != []
    assert all("lora_" in name for name in result["lora_optimized"])
    assert result["lora_moved"] and set(result["lora_moved"]) <= set(result["lora_trainable"])


def test_auto_precision_takes_bf16_only_where_it_is_faster_and_all_ranks_agree():
    from pipelines.training.engine import bf16_is_faster, resolve_precision

    cpu = torch.device("cpu")
    auto = TrainConfig(precision="auto")
    assert resolve_precision(auto, cpu).precision == ("bf16" if bf16_is_faster(cpu) else "fp32")
    assert resolve_precision(auto, cpu, agree=lambda mine: False).precision == "fp32"  # another rank said no
    assert resolve_precision(TrainConfig(precision="bf16"), cpu, agree=lambda mine: False).precision == "bf16"
    assert "auto" not in DTYPES  # never reaches the engine unresolved
