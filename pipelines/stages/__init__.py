"""The stage registry: each stage is its config section plus one function.

Later stages (prepare, train, evaluate, distill, prune, quantize, register) plug in here the
same way: a module with a typed config and a function, and one `Stage(...)` line below.
"""

from pipelines.dag import Stage
from pipelines.stages.ingest import ingest
from pipelines.stages.shard import shard

STAGES: list[Stage] = [
    Stage("ingest", ingest, section="ingest",
          code=("pipelines.data.demo_world", "pipelines.data.records", "pipelines.data.wds_reader")),
    Stage("shard", shard, section="shard", needs=("ingest",), code=("pipelines.data.records",)),
]
