"""The figures every compression stage logs: parameters, size on disk, embedding latency at
batch 1 and 32 with the thread count reported, peak memory of a fresh process."""

from __future__ import annotations

import pytest
import torch

from model.config import model_config
from model.io import SavedModel, save
from model.multimodal import CrossModalModel, parameter_counts
from model.tokenizer import Tokenizer
from pipelines.compression import measure as m
from pipelines.compression.quantize import quantize_torch_int8, save_quantized
from tests.model.demo_data import batch_of, corpus, world_for


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(corpus(world_for(model_config("tiny")), 200), vocab_size=512)
    cfg = model_config("tiny", vocab_size=tokenizer.vocab_size)
    world = world_for(cfg, missing_image=0.25, missing_audio=0.25)
    batches = [batch_of(world, range(start, start + 8), tokenizer, cfg) for start in range(0, 24, 8)]
    saved = SavedModel(CrossModalModel(cfg).eval(), tokenizer)
    root = tmp_path_factory.mktemp("measure")
    folders = {
        "fp32": save(saved, root / "fp32"),
        "torch_int8": save_quantized(quantize_torch_int8(saved), "torch_int8", root / "torch_int8"),
    }
    return saved, batches, folders


def test_folder_size_is_the_sum_of_its_files(tmp_path):
    (tmp_path / "a.json").write_text("x" * 10)
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "b.onnx").write_bytes(b"y" * 1234)
    assert m.folder_size(tmp_path) == 10 + 1234


def test_serving_batch_concatenates_and_repeats_real_rows(demo):
    _, batches, _ = demo
    batch = m.serving_batch(batches[:2], 32)  # 16 real rows, twice
    assert set(batch) == set(m.SERVING_KEYS)
    assert all(v.shape[0] == 32 for v in batch.values())
    length = max(b["text_ids"].shape[1] for b in batches[:2])
    assert batch["text_ids"].shape[1] == length
    assert torch.equal(batch["image"][:8], batches[0]["image"])
    assert torch.equal(batch["image"][16:24], batches[0]["image"])
    assert torch.equal(batch["text_mask"], batch["text_ids"] != 0)
    assert m.serving_batch(batches, 1)["audio"].shape == (1, batches[0]["audio"].shape[1])
    with pytest.raises(ValueError, match="text, image and audio"):
        m.serving_batch([{k: v for k, v in batches[0].items() if k != "audio"}], 4)


def test_parameter_count_counts_int8_weights(demo):
    saved, _, folders = demo
    fp32 = m.parameter_count(saved.model)
    assert fp32 == parameter_counts(saved.model)["total"]
    int8 = m.parameter_count(m.load_folder(folders["torch_int8"]).model)
    head = saved.model.decoder.head.weight.numel()  # tied to the embedding in FP32, its own INT8 copy
    assert int8 == fp32 + head


def test_a_loader_must_be_importable_by_a_fresh_process():
    assert m.loader_name(m.load_folder) == "pipelines.compression.measure:load_folder"
    assert m.loader_name("model.io:load") == "model.io:load"
    with pytest.raises(ValueError, match="not importable"):
        m.loader_name(lambda folder: folder)


@pytest.mark.parametrize("route", ["fp32", "torch_int8"])
def test_latency_and_size_figures(demo, route):
    _, batches, folders = demo
    threads = torch.get_num_threads()
    figures = m.measure(folders[route], batches, threads=1, repeats=5, warmup=1, memory=False)
    assert torch.get_num_threads() == threads  # restored
    assert figures.threads == 1 and figures.repeats == 5
    assert 0 < figures.latency_b1_ms <= figures.latency_b1_p90_ms
    assert 0 < figures.latency_b32_ms <= figures.latency_b32_p90_ms
    assert figures.latency_b32_ms > figures.latency_b1_ms
    assert figures.size_bytes == sum(p.stat().st_size for p in folders[route].iterdir())
    assert figures.parameters > 0
    metrics = figures.metrics(prefix=f"{route}_")
    assert metrics[f"{route}_latency_b32_ms"] == figures.latency_b32_ms and all(
        isinstance(v, float) for v in metrics.values()
    )


@pytest.mark.spawn
def test_peak_memory_of_a_fresh_process(demo):
    _, batches, folders = demo
    peak = m.peak_memory(folders["torch_int8"], m.serving_batch(batches, 32), m.load_folder, threads=1)
    assert 0 < peak["baseline_memory_mb"] < peak["peak_memory_mb"] < 4096
    fp32 = m.peak_memory(folders["fp32"], m.serving_batch(batches, 32), "model.io:load", threads=1)
    assert 0 < fp32["baseline_memory_mb"] < fp32["peak_memory_mb"]
