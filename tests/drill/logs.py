"""Logs people can read: `crossmodal run ... > run.log 2>&1` (stdout and stderr a file, not a
terminal) gets progress as a line every so often, never a bar redrawn with carriage returns;
a failed stage's error starts a line of its own; an application command on a model folder
leaves nothing (no ./runs) in the folder it runs from.

The runs are the real `crossmodal` in a subprocess, joining the drill's Ray cluster when there
is one (RAY_ADDRESS) so no second cluster starts."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from pipelines import env
from tests.conftest import TINY_TRAIN
from tests.drill.case import Drill, Row

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "pipelines" / "configs" / "demo.yaml"
SAMPLES = 16
ANSI = "\x1b["
# A progress report: Ray Data's logged progress, our tasks' (pipelines.parallel.LineProgress),
# the training loop's (pipelines.training.loop.progress_line).
PROGRESS = re.compile(r"Total Progress:|(ingest parts|shards): \d+/\d+|train: step \d+ of")
# Each source of progress: a Ray Data execution, one of our task fan-outs, a training run.
SOURCES = re.compile(r"Running Dataset:|(ingest parts|shards): \d+/\d+ done in|^\[train\] running")
FAILED = "crossmodal: stage 'prepare' failed: prepare.vocabulary_from "
QUICK_TRAIN = TINY_TRAIN


def user_env() -> dict[str, str]:
    """The environment of a user's shell: none of the progress settings this process (or an
    in-process CLI call before it) chose, so the subprocess decides from its own stdout."""
    shell = {k: v for k, v in os.environ.items() if k != env.PROGRESS_ENV and k not in env.PROGRESS_AS_LINES}
    shell["PYTHONPATH"] = str(ROOT)
    shell.pop("MLFLOW_TRACKING_URI", None)
    try:
        import ray

        if ray.is_initialized():  # the drill's cluster: join it rather than start another
            shell["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except ImportError:
        pass
    return shell


def crossmodal(argv: list[str], log: Path, cwd: Path, timeout: float = 900) -> tuple[int, float]:
    """`crossmodal ARGV > log 2>&1` from `cwd`: (exit code, seconds)."""
    started = time.monotonic()
    with open(log, "wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *argv],
            cwd=cwd,
            env=user_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    return done.returncode, time.monotonic() - started


def progress_rows(case: str, done: str, log: Path, code: int, seconds: float) -> list[Row]:
    text = log.read_bytes().decode("utf-8", errors="replace")
    lines = text.splitlines()
    # Ray's log deduplication colours its "[repeated Nx across cluster]" note whatever the
    # settings (ray._private.ray_logging._color): those are counted apart, every other is a fault.
    returns = text.count("\r")
    colours = sum(line.count(ANSI) for line in lines if "[repeated " not in line)
    deduplicated = sum("[repeated " in line for line in lines)
    reports = sum(bool(PROGRESS.search(line)) for line in lines)
    sources = sum(bool(SOURCES.search(line)) for line in lines)
    bound = sources * (2 + math.ceil(seconds / env.PROGRESS_LINE_EVERY_S))
    return [
        Row(
            f"{case}-no-redraw",
            f"{done}, > file 2>&1",
            "exit 0; no '\\r', no colour codes (but Ray's green '[repeated Nx]' note)",
            f"exit {code} in {seconds:.0f} s; {len(lines)} lines, {returns} '\\r', {colours} ANSI escapes "
            f"({deduplicated} Ray dedup notes)",
            code == 0 and returns == 0 and colours == 0,
        ),
        Row(
            f"{case}-progress-bounded",
            f"{done}: count progress reports",
            f"progress lines <= sources x (2 + s/{env.PROGRESS_LINE_EVERY_S}) = {bound} (a line per 30 s)",
            f"{reports} progress lines from {sources} sources (Ray Data runs, task fan-outs, train) in {seconds:.0f} s",
            sources > 0 and 0 < reports <= bound,
        ),
    ]


def failure_row(scratch: Path, where: list[str]) -> Row:
    """A stage forced to fail (prepare given a model folder without a tokenizer to take its
    vocabulary from): its error is a line of its own, from column 0, naming the key."""
    junk = scratch / "junk-model"
    junk.mkdir(exist_ok=True)
    (junk / "config.json").write_text("{}")
    argv = ["run", str(DEMO), *where, f"--set=ingest.demo.num_samples={SAMPLES}", "--only", "ingest,shard,prepare"]
    argv += [f"--set=train.init_from={junk}", f"--set=prepare.vocabulary_from={junk}"]
    log = scratch / "failed.log"
    code, seconds = crossmodal(argv, log, scratch)
    text = log.read_bytes().decode("utf-8", errors="replace")
    own = [line for line in text.split("\n") if line.startswith(FAILED)]
    inside = [line for line in text.split("\n") if FAILED in line and not line.startswith(FAILED)]
    shown = (own or inside or ["(no error line)"])[0]
    return Row(
        "logs-error-own-line",
        "prepare forced to fail (train.init_from: a folder with only an empty config.json), > file 2>&1",
        f"exit 1; '{FAILED.strip()} ...' starts a line, nothing before it",
        f"exit {code} in {seconds:.0f} s; {len(own)} line(s) from column 0, {len(inside)} mid-line: "
        + shown[:160].replace("|", "\\|"),
        code == 1 and len(own) == 1 and not inside and "\r" not in text,
    )


def app_row(scratch: Path) -> Row:
    """`crossmodal caption MODEL_FOLDER image.png` from an empty folder leaves it empty."""
    from pipelines.compression.pyfunc import example_files
    from tests.pipelines.compression.test_pyfunc import tiny_model

    folder = tiny_model(scratch / "model")
    image = scratch / "square.png"
    image.write_bytes(example_files()[0])
    cwd = scratch / "empty-cwd"
    cwd.mkdir()
    found = []
    for command in (["caption", str(folder), str(image)], ["answer", str(folder), str(image), "what shape?"]):
        code, _ = crossmodal(command, scratch / f"{command[0]}.log", cwd)
        found.append((command[0], code, sorted(p.name for p in cwd.iterdir())))
    return Row(
        "app-no-runs-folder",
        "caption and answer with a model folder, from an empty folder, MLFLOW_TRACKING_URI unset",
        "exit 0; the folder stays empty (no ./runs)",
        "; ".join(f"{name}: exit {code}, left {left or 'nothing'}" for name, code, left in found),
        all(code == 0 and not left for _, code, left in found),
    )


def quick(scratch: Path) -> list[Row]:
    where = [f"--set=storage.root={scratch / 'storage'}", f"--set=mlflow.local_store={scratch / 'runs'}"]
    argv = ["run", str(DEMO), *where, f"--set=ingest.demo.num_samples={SAMPLES}", "--only", "ingest,shard,prepare"]
    argv += ["--set=prepare.image_size=32", "--set=prepare.preview_samples=2"]
    log = scratch / "prepare.log"
    code, seconds = crossmodal(argv, log, scratch)
    rows = progress_rows("logs-prepare", f"ingest, shard, prepare of {SAMPLES} demo samples", log, code, seconds)
    # Reuses ingest and shard from the run above: only prepare runs, and fails.
    return [*rows, failure_row(scratch, where), app_row(scratch)]


def slow(scratch: Path) -> list[Row]:
    where = [f"--set=storage.root={scratch / 'storage'}", f"--set=mlflow.local_store={scratch / 'runs'}"]
    argv = ["run", str(DEMO), *where, "--set=ingest.demo.num_samples=120", *(f"--set={o}" for o in QUICK_TRAIN)]
    log = scratch / "pipeline.log"
    code, seconds = crossmodal(argv, log, scratch)
    return progress_rows("logs-train", "ingest to evaluate, tiny model, 4 steps", log, code, seconds)


DRILLS = [
    Drill("logs_to_file", "logs", quick, slow=True, needs_ray=True),  # 70 s: make drill only
    Drill("logs_train_to_file", "logs", slow, slow=True, needs_ray=True),
]
