"""Three tiny stages (first -> second -> third) for DAG tests; they run as real Ray tasks.

Flags in the storage root steer `second`: `fail-second` makes it raise, `block-second` makes it
announce itself and block forever (so a test can kill the driver in the middle of a stage).
Run as a module, this is a driver process: `python -m tests.pipelines.toy_stages CONFIG [--set ...]`.
"""

from __future__ import annotations

import sys
import threading

import ray.cloudpickle

from pipelines.dag import Stage, StageResult
from pipelines.storage import Storage

# Ray workers need not be able to import the tests package: ship these functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def chain(ctx, name: str, upstream: str | None) -> StageResult:
    before = Storage(ctx.inputs[upstream].outputs["data"]).read_bytes("data.txt") + b"+" if upstream else b""
    ctx.output.write_bytes(before + name.encode(), "data.txt")
    return StageResult(
        outputs={"data": ctx.output.uri}, metrics={"length": len(before) + len(name), "forced": float(ctx.forced)}
    )


def first(section, ctx):
    return chain(ctx, "first", None)


def second(section, ctx):
    if ctx.storage.exists("block-second"):
        print("second: started and blocking", flush=True)
        threading.Event().wait()
    if ctx.storage.exists("fail-second"):
        raise RuntimeError("second failed on purpose")
    return chain(ctx, "second", "first")


def third(section, ctx):
    return chain(ctx, "third", "second")


STAGES = [
    Stage("first", first, section="ingest"),
    Stage("second", second, section="shard", needs=("first",)),
    Stage("third", third, section="shard", needs=("second",)),
]

if __name__ == "__main__":
    from pipelines.config import load_config
    from pipelines.runner import run_pipeline

    run_pipeline(load_config(sys.argv[1], sys.argv[2:]), stages=STAGES)
