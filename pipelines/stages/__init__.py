"""The stage registry: each stage is its config section plus one function.

Later stages (prepare, train, evaluate, distill, prune, quantize, register) plug in here the
same way: a module with a typed config and a function, and one `Stage(...)` line below.
"""

from pipelines.dag import Stage
from pipelines.stages.evaluate import evaluate
from pipelines.stages.ingest import ingest, source_fingerprint
from pipelines.stages.prepare import prepare
from pipelines.stages.shard import shard
from pipelines.stages.train import train

STAGES: list[Stage] = [
    Stage(
        "ingest",
        ingest,
        section="ingest",
        fingerprint=source_fingerprint,
        code=("pipelines.data.demo_world", "pipelines.data.records", "pipelines.data.wds_reader"),
    ),
    Stage("shard", shard, section="shard", needs=("ingest",), code=("pipelines.data.records",)),
    Stage(
        "prepare",
        prepare,
        section="prepare",
        needs=("shard",),
        code=(
            "pipelines.data.augment",
            "pipelines.data.balance",
            "pipelines.data.dataset",
            "pipelines.data.datasource",
            "pipelines.data.decode",
            "pipelines.data.transforms",
            "pipelines.data.wds_reader",
            "model.tokenizer",
        ),
    ),
    Stage(
        "train",
        train,
        section="train",
        needs=("prepare",),
        code=(
            "pipelines.training.config",
            "pipelines.training.engine",
            "pipelines.training.loop",
            "pipelines.training.ray_worker",
            "pipelines.training.evaluation",
            "pipelines.evaluation.metrics",
            "pipelines.data.collate",
            "model.multimodal",
            "model.encoders",
            "model.fusion",
            "model.decoder",
            "model.heads",
            "model.objectives",
            "model.layers",
            "model.config",
        ),
    ),
    Stage(
        "evaluate",
        evaluate,
        section="evaluate",
        needs=("prepare", "train"),
        code=(
            "pipelines.evaluation.collect",
            "pipelines.evaluation.metrics",
            "pipelines.evaluation.plots",
            "pipelines.evaluation.report",
            "pipelines.apps.predict",
            "pipelines.apps.safety",
            "pipelines.apps.resolve",
            "pipelines.data.collate",
            "model.multimodal",
            "model.decoder",
            "model.io",
        ),
    ),
]
