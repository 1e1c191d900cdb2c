"""Every script in benchmarks/ runs to its printed ratio at a tiny size, so none can rot
unnoticed. The figures are not asserted here: benchmarks/RESULTS.md holds the measured ones."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port

SCRIPTS = {
    # The ONNX route's export (20-40 s) is tested in tests/pipelines/compression.
    "compression.py": ["--synthetic", "--repeats", "3", "--set", "quantize.routes=[torch_int8]"],
    "data_throughput.py": ["--samples", "48", "--workers", "1", "--epochs", "1"],
    # With --spec (data alone, the loop): tests/pipelines/stages/test_train_stage.py.
    "gpu_step.py": ["--device", "cpu", "--size", "tiny", "--batch", "2", "--steps", "1", "--warmup", "1"],
    "model_step.py": ["--sizes", "tiny", "--steps", "1", "--batch", "2"],
    "zero_overhead.py": ["--size", "tiny", "--batch", "2", "--steps", "1", "--warmup", "1"],
}
PRINTS = {
    "compression.py": "student vs teacher: parameters",
    "data_throughput.py": "ratio ray data / DataLoader:",
    "gpu_step.py": "ZeRO-2 bf16 / AMP step:",
    "model_step.py": "tiny",
    "zero_overhead.py": "ZeRO-2",
}


def test_every_benchmark_script_is_smoke_tested():
    assert {p.name for p in (REPO / "benchmarks").glob("*.py")} == set(SCRIPTS)


@pytest.mark.spawn
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_the_benchmark_runs_at_a_tiny_size(script, tmp_path):
    extra = ["--port", str(free_port())] if script in ("zero_overhead.py", "gpu_step.py") else []
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *SCRIPTS[script], *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert PRINTS[script] in done.stdout, done.stdout[-2000:]
