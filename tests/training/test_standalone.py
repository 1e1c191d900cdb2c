"""The standalone launcher's user mistakes: one line naming the file or the override, exit 2."""

from __future__ import annotations

import pytest

from pipelines.training.standalone import main
from tests.conftest import DEMO_CONFIG

PROG = "python -m pipelines.training.standalone"


def error_of(capsys, tmp_path, spec, *overrides) -> str:
    with pytest.raises(SystemExit) as caught:
        main(["--spec", str(spec), "--config", str(DEMO_CONFIG), "--out", str(tmp_path / "out"),
              *[f"--set={o}" for o in overrides]])
    assert caught.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_missing_spec_is_named(capsys, tmp_path):
    spec = tmp_path / "nope.json"
    assert error_of(capsys, tmp_path, spec) == f"{PROG}: {spec}: cannot read the dataset spec (No such file or directory)"


@pytest.mark.parametrize("text, detail", [
    ("{not json", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ('{"seed": 0}', "shards: Field required"),
])
def test_a_file_that_is_not_a_spec_is_named(capsys, tmp_path, text, detail):
    spec = tmp_path / "spec.json"
    spec.write_text(text)
    assert error_of(capsys, tmp_path, spec) == f"{PROG}: {spec}: not a dataset spec written by the prepare stage ({detail})"


def test_overrides_are_checked_against_the_train_section_only(capsys, tmp_path):
    spec = tmp_path / "nope.json"
    assert error_of(capsys, tmp_path, spec, "prepare.seed=1") == f"{PROG}: --set prepare.seed=1: only train.* keys apply here"
    assert error_of(capsys, tmp_path, spec, "train.precision=fp8").startswith(
        f"{PROG}: --set train.precision=fp8: train.precision: input should be ")
