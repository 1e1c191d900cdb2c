"""The stage registry: each stage is its config section plus one function.

A new stage is a module with its function (its config section in `pipelines.config`) and one
`Stage(...)` line below. Its identity follows the code it imports (`pipelines.dag.code_version`).
"""

from pipelines.dag import Stage
from pipelines.stages.evaluate import evaluate
from pipelines.stages.ingest import ingest, source_fingerprint
from pipelines.stages.prepare import prepare
from pipelines.stages.shard import shard
from pipelines.stages.train import train

STAGES: list[Stage] = [
    Stage("ingest", ingest, section="ingest", fingerprint=source_fingerprint),
    Stage("shard", shard, section="shard", needs=("ingest",)),
    Stage("prepare", prepare, section="prepare", needs=("shard",)),
    Stage("train", train, section="train", needs=("prepare",)),
    Stage("evaluate", evaluate, section="evaluate", needs=("prepare", "train")),
]
