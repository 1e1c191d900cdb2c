"""The pure DAG parts: ordering, selection and stage identity."""

from __future__ import annotations

import pytest

from pipelines.config import load_config
from pipelines.dag import (
    PlanError,
    Stage,
    StageResult,
    ancestors,
    code_digest,
    configured,
    descendants,
    identity,
    import_closure,
    order,
    select,
)
from pipelines.stages import STAGES
from tests.conftest import DEMO_CONFIG


def noop(section, ctx):
    return StageResult()


def stage(name, *needs):
    return Stage(name, noop, section="shard", needs=needs)


DIAMOND = [
    stage("report", "train", "evaluate"),
    stage("evaluate", "train"),
    stage("train", "prepare"),
    stage("prepare"),
]


def names(stages):
    return [s.name for s in stages]


def test_order_puts_every_stage_after_its_needs():
    assert names(order(DIAMOND)) == ["prepare", "train", "evaluate", "report"]


def test_order_keeps_registry_order_among_independent_stages():
    assert names(order([stage("b"), stage("a"), stage("c", "a")])) == ["b", "a", "c"]


def test_registry_mistakes_are_one_line_errors():
    with pytest.raises(PlanError, match="stages form a cycle: a -> b -> a"):
        order([stage("a", "b"), stage("b", "a")])
    with pytest.raises(PlanError, match="stage 'a' needs 'ghost', which is not a stage"):
        order([stage("a", "ghost")])
    with pytest.raises(PlanError, match="registered twice"):
        order([stage("a"), stage("a")])


def test_select_all_only_and_from():
    ordered = order(DIAMOND)
    assert select(ordered) == {"prepare", "train", "evaluate", "report"}
    assert select(ordered, only=["train", "report"]) == {"train", "report"}
    assert select(ordered, from_stage="train") == {"train", "evaluate", "report"}
    assert select(ordered, only=["prepare", "evaluate"], from_stage="train") == {"evaluate"}


def test_select_rejects_unknown_and_empty():
    ordered = order(DIAMOND)
    with pytest.raises(PlanError, match=r"unknown stage 'trian' \(stages: prepare, train, evaluate, report\)"):
        select(ordered, only=["trian"])
    with pytest.raises(PlanError, match="leave no stage"):
        select(ordered, only=["prepare"], from_stage="train")


def test_ancestors_and_descendants():
    ordered = order(DIAMOND)
    assert ancestors(ordered, {"report"}) == {"prepare", "train", "evaluate"}
    assert descendants(ordered, {"train"}) == {"train", "evaluate", "report"}


def test_identity_follows_config_inputs_code_and_storage():
    cfg = load_config(DEMO_CONFIG)
    ingest, shard = STAGES[:2]
    base = identity(shard, cfg.shard, {"ingest": "i1"}, "file:///r")
    assert base == identity(shard, load_config(DEMO_CONFIG).shard, {"ingest": "i1"}, "file:///r")
    changed_config = load_config(DEMO_CONFIG, ["shard.samples_per_shard=3"]).shard
    assert identity(shard, changed_config, {"ingest": "i1"}, "file:///r") != base
    assert identity(shard, cfg.shard, {"ingest": "i2"}, "file:///r") != base
    assert identity(shard, cfg.shard, {"ingest": "i1"}, "file:///elsewhere") != base
    # Same config section, other code (another stage function): another identity.
    assert (
        identity(Stage("shard", noop, section="shard", needs=("ingest",)), cfg.shard, {"ingest": "i1"}, "file:///r")
        != base
    )
    # A stage's identity does not move when an unrelated section changes.
    other = load_config(DEMO_CONFIG, ["ingest.demo.seed=5"])
    assert identity(shard, other.shard, {"ingest": "i1"}, "file:///r") == base
    assert identity(ingest, other.ingest, {}, "file:///r") != identity(ingest, cfg.ingest, {}, "file:///r")


def test_a_stages_code_is_every_project_module_it_imports_directly_or_not(tmp_path):
    """A stage module imports a helper inside a function, the helper a deep module, relatively:
    a change to the deep module changes the code version, a change elsewhere does not."""
    package = tmp_path / "pipelines"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "stage.py": "import os\n\ndef run(cfg, ctx):\n    from pipelines.sub import helper\n    return helper.go()\n",
        "sub/__init__.py": "",
        "sub/helper.py": "from . import deep\nfrom model import tokenizer  # not in this tree: ignored\ngo = deep.go\n",
        "sub/deep.py": "def go():\n    return 1\n",
        "unrelated.py": "X = 1\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    closure = import_closure("pipelines.stage", tmp_path)
    assert closure == ["pipelines.stage", "pipelines.sub.deep", "pipelines.sub.helper"]
    before = code_digest(closure, tmp_path)
    (package / "unrelated.py").write_text("X = 2\n")
    assert code_digest(import_closure("pipelines.stage", tmp_path), tmp_path) == before
    (package / "sub" / "deep.py").write_text("def go():\n    return 2\n")
    assert code_digest(import_closure("pipelines.stage", tmp_path), tmp_path) != before


def test_the_registered_stages_follow_what_they_really_import():
    closures = {stage.name: import_closure(stage.run.__module__) for stage in STAGES}
    assert {"model.io", "model.multimodal", "pipelines.training.loop", "pipelines.evaluation.collect"} <= set(
        closures["train"]
    )
    assert {"pipelines.inference.predict", "pipelines.inference.resolve", "model.io"} <= set(closures["evaluate"])
    assert {"pipelines.data.demo_world", "pipelines.data.wds_reader"} <= set(closures["ingest"])
    assert not any(m.startswith(("model.", "pipelines.training")) for m in closures["ingest"])
    assert "pipelines.config.train" not in closures["ingest"]  # another section's schema is not its code


@pytest.mark.parametrize(
    "tags, params, reason",
    [
        ({"crossmodal.code_version": "b"}, {"shard.x": "1"}, "its code changed since run abcdef12"),
        (
            {"crossmodal.code_version": "a", "crossmodal.input.ingest.data": "u2"},
            {"shard.x": "1"},
            "its input from ingest changed since run abcdef12",
        ),
        (
            {"crossmodal.code_version": "a", "crossmodal.input.ingest.data": "u1"},
            {"shard.x": "1"},
            "its external data or storage root changed since run abcdef12",
        ),
        (
            {"crossmodal.code_version": "b"},
            {"shard.x": "2", "shard.y": "3"},
            "its config changed since run abcdef12: shard.x 1 -> 2, shard.y (unset) -> 3",
        ),
    ],
)
def test_why_a_stage_needs_a_new_run(tags, params, reason):
    from types import SimpleNamespace

    from pipelines.runner import why_new

    previous = SimpleNamespace(
        info=SimpleNamespace(run_id="abcdef1234"),
        data=SimpleNamespace(
            params={"shard.x": "1"}, tags={"crossmodal.code_version": "a", "crossmodal.input.ingest.data": "u1"}
        ),
    )
    assert why_new(previous, tags, params) == reason
    assert why_new(None, tags, params) == "it never finished in this experiment"


def compression_plan(*overrides: str) -> list[str]:
    cfg = load_config(DEMO_CONFIG, list(overrides))
    return [f"{s.name}<{','.join(s.needs)}" for s in order(configured(STAGES, lambda s: getattr(cfg, s.section)))]


def test_the_demo_runs_every_compression_stage_from_the_model_each_source_names():
    assert compression_plan()[-4:] == [
        "distill<prepare,train",
        "prune<prepare,distill",
        "quantize<prepare,prune",
        "register<evaluate,quantize",
    ]


def test_a_switched_off_stage_leaves_the_plan_and_a_source_can_skip_it():
    plan = compression_plan("distill.enabled=false", "prune.source=train", "registry.enabled=false")
    assert [step.split("<")[0] for step in plan][-2:] == ["prune", "quantize"]
    assert "prune<prepare,train" in plan


def test_a_source_that_is_switched_off_is_a_one_line_error():
    with pytest.raises(PlanError, match=r"stage 'prune' uses 'distill', which is off .* prune.source"):
        compression_plan("distill.enabled=false")


def test_compression_is_off_unless_a_config_turns_it_on():
    from pipelines.config import PipelineConfig

    cfg = PipelineConfig(name="plain")
    stages = [s.name for s in configured(STAGES, lambda s: getattr(cfg, s.section))]
    assert stages == ["ingest", "shard", "prepare", "train", "evaluate"]


def test_evaluate_needs_no_train_stage_when_it_is_given_a_model():
    assert "evaluate<prepare,train" in compression_plan()
    assert "evaluate<prepare" in compression_plan("evaluate.model=runs/some/model")
