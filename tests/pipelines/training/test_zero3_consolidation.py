"""ZeRO-3 on 2 processes (real DeepSpeed, gloo): the consolidated checkpoint is the live model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from model.config import model_config


def worker(rank: int, folder: str, port: int) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from model.multimodal import CrossModalModel
    from model.synthetic import synthetic_batch
    from pipelines.config.train import TrainConfig
    from pipelines.training.engine import import_deepspeed, initialize

    import_deepspeed().init_distributed(dist_backend="gloo")
    cfg = TrainConfig(zero_stage=3, precision="fp32", micro_batch=4, lr=1e-3, warmup_steps=0)
    torch.manual_seed(0)
    model_cfg = model_config("tiny")
    engine, _ = initialize(CrossModalModel(model_cfg), cfg, world_size=2)
    batch = synthetic_batch(model_cfg, 4, seed=rank)
    for _ in range(2):
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(folder, tag="step2")
    engine.eval()
    with torch.no_grad():  # the live engine's outputs (ZeRO-3 gathers each module's weights on use)
        probe = synthetic_batch(model_cfg, 3, seed=99)
        outputs = engine.module.model(probe)
    if rank == 0:
        torch.save({k: v.clone() for k, v in outputs.items()}, Path(folder) / "live_outputs.pt")


@pytest.mark.spawn
def test_zero3_checkpoint_consolidates_to_the_live_model(tmp_path):
    from model.multimodal import CrossModalModel
    from model.synthetic import synthetic_batch
    from pipelines.training.engine import consolidate
    from tests.conftest import free_port

    mp.spawn(worker, args=(str(tmp_path), free_port()), nprocs=2, join=True)
    state = consolidate(tmp_path, zero_stage=3)
    model = CrossModalModel(model_config("tiny"))
    loaded = model.load_state_dict(state, strict=True)
    assert not loaded.missing_keys and not loaded.unexpected_keys
    model.eval()
    live = torch.load(tmp_path / "live_outputs.pt")
    with torch.no_grad():
        again = model(synthetic_batch(model_config("tiny"), 3, seed=99))
    assert live.keys() == again.keys()
    for key in live:
        assert torch.allclose(live[key], again[key], atol=1e-5), key
    # The weights really moved away from initialisation: this is a trained state.
    torch.manual_seed(0)
    fresh = CrossModalModel(model_config("tiny")).state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in state.items())
