"""The stage registry: each stage is its config section plus one function.

A new stage is a module with its function (its config section in `pipelines.config`) and one
`Stage(...)` line below. Its identity follows the code it imports (`pipelines.dag.code_version`).
"""

from pipelines.dag import Stage
from pipelines.stages.distill import distill
from pipelines.stages.evaluate import evaluate
from pipelines.stages.ingest import ingest, source_fingerprint
from pipelines.stages.prepare import prepare
from pipelines.stages.prune import prune
from pipelines.stages.quantize import quantize
from pipelines.stages.register import register
from pipelines.stages.shard import shard
from pipelines.stages.train import train

STAGES: list[Stage] = [
    Stage("ingest", ingest, section="ingest", fingerprint=source_fingerprint),
    Stage("shard", shard, section="shard", needs=("ingest",)),
    Stage("prepare", prepare, section="prepare", needs=("shard",), references=("vocabulary_from",)),
    Stage("train", train, section="train", needs=("prepare",), references=("init_from",)),
    # evaluate.model, when given, is pinned like the other references: a folder or a registered
    # model that is not there is a one-line error before any stage runs, not after training. With
    # it, evaluate scores that model and needs no train stage (`--only evaluate` runs alone).
    Stage(
        "evaluate",
        evaluate,
        section="evaluate",
        needs=("prepare", "train"),
        references=("model",),
        uses=lambda s: ("prepare",) if s.model else ("prepare", "train"),
    ),
    # Compression (off unless their sections say enabled: true). `source` picks the model each
    # one takes, so each needs every stage it could take it from and uses the chosen one.
    Stage("distill", distill, section="distill", needs=("prepare", "train")),
    Stage("prune", prune, section="prune", needs=("prepare", "train", "distill"), uses=lambda s: ("prepare", s.source)),
    Stage(
        "quantize",
        quantize,
        section="quantize",
        needs=("prepare", "train", "distill", "prune"),
        uses=lambda s: ("prepare", s.source),
    ),
    Stage(
        "register",
        register,
        section="registry",
        needs=("evaluate", "train", "distill", "prune", "quantize"),
        uses=lambda s: ("evaluate", s.source),
    ),
]
