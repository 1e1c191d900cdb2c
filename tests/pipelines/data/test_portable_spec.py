"""The prepared stream is portable: a shipped word table is named, not a path into the
checkout that prepared it, and is found where the code runs (another checkout, a Ray job's
working_dir, another node). The slow test prepares here and trains from a copy of the project."""

from __future__ import annotations

import json

import pytest

from pipelines.config import load_config
from pipelines.config.prepare import DATA_TABLES, table_path, word_groups
from pipelines.data.spec import DatasetSpec
from tests.conftest import DEMO_CONFIG, REPO


def test_the_demo_spec_names_its_table_and_holds_no_checkout_path(tmp_path):
    cfg = load_config(DEMO_CONFIG, [f"storage.root={tmp_path}"])
    assert cfg.prepare.augment.negatives.words_file == "contrast_shapes_positions.txt"
    spec = DatasetSpec(
        shards={"train": [f"file://{tmp_path}/train/shard-000000.tar"]},
        decode={},
        tokenizer_json="{}",
        answers=[],
        max_text_len=8,
        augment=cfg.prepare.augment,
        multiplicity={},
        weights={},
        seed=0,
        member_limit=1,
    )
    assert str(REPO) not in json.dumps(spec.model_dump(mode="json"))


def test_a_named_table_resolves_where_the_code_runs_and_a_users_file_stays_as_given(tmp_path):
    assert table_path("contrast_shapes_positions.txt") == DATA_TABLES / "contrast_shapes_positions.txt"
    assert word_groups("contrast_shapes_positions.txt")  # read from this checkout's pipelines/data
    own = tmp_path / "mine.txt"
    own.write_text("left right\n")
    assert table_path(str(own)) == own
    assert word_groups(str(own)) == [["left", "right"]]


@pytest.mark.slow
@pytest.mark.spawn
def test_prepare_here_train_from_a_copy_of_the_project(tmp_path, ray_cluster):
    from tests.drill.security import portable_spec

    rows = portable_spec(tmp_path)
    assert [r.case for r in rows if not r.passed] == [], "\n".join(f"{r.case}: {r.outcome}" for r in rows)
