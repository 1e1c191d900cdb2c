"""Moving the champion by hand: promote and rollback record who and why, and refuse what is not there."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from jobs.cli import main
from jobs.promote import HISTORY_TAG, RegistryError, move_alias, rollback


@pytest.fixture
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("tiny")
    for _ in range(3):
        client.create_model_version("tiny", str(tmp_path / "model"))
    return uri, client


def champion(client) -> int:
    return int(client.get_model_version_by_alias("tiny", "champion").version)


def test_promote_and_rollback_move_the_alias_and_record_who_and_why(registry):
    uri, client = registry
    move_alias(client, "tiny", "champion", 1, "promote", "first", by="nightly gate")
    move_alias(client, "tiny", "champion", 3, "promote", "better recall", by="ana")
    assert champion(client) == 3
    assert "by ana: better recall" in client.get_model_version("tiny", "3").tags["crossmodal.promote"]

    back = rollback(client, "tiny", "champion", "v3 answers in French", by="bo")
    assert (back.previous, back.version, champion(client)) == (3, 1, 1)
    assert "by bo: v3 answers in French" in client.get_model_version("tiny", "1").tags["crossmodal.rollback"]
    moves = json.loads(client.get_registered_model("tiny").tags[HISTORY_TAG])
    assert [(m["action"], m["version"], m["previous"]) for m in moves] == [
        ("promote", 1, None),
        ("promote", 3, 1),
        ("rollback", 1, 3),
    ]
    with pytest.raises(RegistryError, match="no earlier version recorded"):
        rollback(client, "tiny", "champion", "again")  # version 1 was the first champion


def test_the_cli_promotes_and_rolls_back_with_one_line_errors(registry, capsys):
    uri, client = registry
    base = ["--tracking-uri", uri, "--model", "tiny"]
    assert main(["promote", "2", "--why", "hand-checked", "--by", "ana", *base]) == 0
    assert main(["promote", "3", "--why", "newer", *base]) == 0
    assert "tiny@champion: version 2 -> 3" in capsys.readouterr().out
    assert main(["rollback", "--why", "regression in prod", *base]) == 0
    assert "rolled back version 3 -> 2" in capsys.readouterr().out
    assert champion(client) == 2

    assert main(["promote", "9", "--why", "x", *base]) == 2
    assert capsys.readouterr().err.strip() == "crossmodal: error: tiny version 9: no such registered model version"
    assert main(["rollback", "--why", "x", "--alias", "staging", *base]) == 2
    assert "tiny@staging: no such alias" in capsys.readouterr().err
