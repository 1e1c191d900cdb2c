"""Starting from a model: the config keys, what a reference resolves to (folder, storage URI,
runs:/, models:/ with the crossmodal.trained_model tag, the INT8 refusal), the shape check,
and stage identities that follow what an alias names. A tiny model (random weights) registered
in a tmp sqlite store; no Ray."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipelines.config import ConfigError, load_config
from pipelines.dag import StageError
from pipelines.inference.pin import TRAINED_TAG, ModelNotFound, pin
from pipelines.runner import plan_state
from pipelines.storage import to_uri
from pipelines.training.init_from import check_fits, float_folder
from tests.conftest import DEMO_CONFIG, small_overrides
from tests.pipelines.compression.test_pyfunc import tiny_model

NAME = "crossmodal"


def register(client: MlflowClient, run_id: str, folder: Path, tags: dict | None = None) -> str:
    """A new version of NAME whose source is `folder` logged as the run's artifact model/<n>:
    the registry as the register stage leaves it, without a pyfunc wrapper (resolution finds a
    model folder one to three levels down either way)."""
    query = f"name = '{NAME}'"
    path = f"model{len(client.search_model_versions(query))}"
    client.log_artifacts(run_id, str(folder), path)
    source = f"{client.get_run(run_id).info.artifact_uri}/{path}"
    return str(client.create_model_version(NAME, source, run_id=run_id, tags=tags).version)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """Versions 1 (float), 2 (INT8, untagged), 3 (INT8 tagged with its float model), 4 (another
    float model); the alias champion names version 1."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    run_id = client.create_run(client.create_experiment("x", (root / "artifacts").as_uri())).info.run_id
    client.create_registered_model(NAME)
    float_folder_ = tiny_model(root / "float")
    quantized = root / "int8"
    shutil.copytree(float_folder_, quantized)
    (quantized / "quantized.json").write_text("{}")  # the marker is what makes a folder INT8
    other = root / "other"
    shutil.copytree(float_folder_, other)
    (other / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    versions = [
        register(client, run_id, float_folder_),
        register(client, run_id, quantized),
        register(client, run_id, quantized, {TRAINED_TAG: to_uri(str(float_folder_))}),
        register(client, run_id, other),
    ]
    assert versions == ["1", "2", "3", "4"]
    client.set_registered_model_alias(NAME, "champion", "1")
    return {"uri": uri, "client": client, "run_id": run_id, "float": float_folder_, "int8": quantized, "root": root}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # downloaded models are cached under ~/.cache


def weights(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


# -- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lora.rank=0", "train.lora.rank"),
        ("train.lora.alpha=0", "train.lora.alpha"),
        ("train.lora.dropout=1.0", "train.lora.dropout"),
        ("train.lora.targets='(fusion'", "train.lora.targets"),
        ("train.init_from=models:/crossmodal", "train.init_from"),
        ("train.init_from=runs:/abc", "train.init_from"),
        ("train.init_from=' '", "train.init_from"),
        ("prepare.vocabulary_from=/some/model", "prepare.vocabulary_from"),  # without train.init_from
    ],
)
def test_a_bad_init_or_lora_key_is_one_line_naming_it(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO_CONFIG, [override])
    message = str(err.value)
    assert "\n" not in message and message.removeprefix(f"--set {override}: ").startswith(key), message


def test_vocabulary_from_follows_init_from_and_lora_defaults_to_a_full_fine_tune():
    cfg = load_config(DEMO_CONFIG, ["train.init_from=models:/crossmodal@champion"])
    assert cfg.prepare.vocabulary_from == "models:/crossmodal@champion"
    assert cfg.train.lora.rank is None and cfg.train.lora.adapters() is None
    lora = load_config(DEMO_CONFIG, ["train.lora.rank=4", "train.lora.targets=fusion.*"]).train.lora
    assert lora.adapters() == {"rank": 4, "alpha": 16, "dropout": 0.0, "targets": "fusion.*", "train_heads": False}
    assert load_config(DEMO_CONFIG).prepare.vocabulary_from is None


# -- shapes ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "have, want, message",
    [
        (
            {"text.embed.weight": torch.zeros(1024, 64)},
            {"text.embed.weight": torch.zeros(900, 64)},
            "train.init_from models:/crossmodal/3: tensor text.embed.weight is [1024, 64] in the model, "
            "[900, 64] in train.model",
        ),
        ({}, {"a.weight": torch.zeros(1)}, "train.init_from models:/crossmodal/3: tensor a.weight of train.model"),
        ({"a.weight": torch.zeros(1)}, {}, "train.init_from models:/crossmodal/3: tensor a.weight of the model"),
    ],
)
def test_weights_that_do_not_fit_train_model_name_the_tensor(have, want, message):
    with pytest.raises(StageError) as err:
        check_fits(have, want, "train.init_from models:/crossmodal/3")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


# -- resolution --------------------------------------------------------------------------------
def test_a_folder_a_storage_uri_and_a_run_resolve_to_the_float_model(store):
    float_weights = weights(store["float"])
    assert float_folder(str(store["float"]), store["uri"]) == store["float"]
    assert float_folder(to_uri(str(store["float"])), store["uri"]) == store["float"]
    downloaded = float_folder(f"runs:/{store['run_id']}/model0", store["uri"])
    assert weights(downloaded) == float_weights


@pytest.mark.parametrize("ref", ["models:/crossmodal/1", "models:/crossmodal@champion", "models:/crossmodal/3"])
def test_a_registered_version_resolves_to_its_float_model(store, ref):
    """Version 3 is INT8: its crossmodal.trained_model tag names the float folder it came from."""
    assert weights(float_folder(ref, store["uri"])) == weights(store["float"])


def test_an_int8_model_without_its_float_model_is_refused_in_one_line(store):
    with pytest.raises(ModelNotFound) as err:
        float_folder("models:/crossmodal/2", store["uri"])
    message = str(err.value)
    assert message.startswith("models:/crossmodal/2: version 2 of crossmodal is quantized (INT8)")
    assert TRAINED_TAG in message and "\n" not in message
    with pytest.raises(ModelNotFound, match="quantized"):
        float_folder(str(store["int8"]), store["uri"])


def test_pins_name_the_version_and_the_content(store, tmp_path):
    assert pin("models:/crossmodal@champion", store["uri"]).ref == "models:/crossmodal/1"
    assert pin("models:/crossmodal/3", store["uri"]).digest.endswith(to_uri(str(store["float"])))  # the tag counts
    copy = shutil.copytree(store["float"], tmp_path / "copy")
    before = pin(str(copy), None)
    assert before.ref == str(copy.resolve()) and before == pin(str(copy), None)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert pin(str(copy), None).digest != before.digest  # a folder written over is another model
    with pytest.raises(ModelNotFound, match="no such model folder"):
        pin(str(tmp_path / "nowhere"), None)


# -- identity ----------------------------------------------------------------------------------
def identities(store, tmp_path, ref: str) -> dict[str, str]:
    overrides = [*small_overrides(tmp_path), f"mlflow.tracking_uri={store['uri']}", f"train.init_from={ref}"]
    return {stage.name: ident for stage, ident, _ in plan_state(load_config(DEMO_CONFIG, overrides))}


def test_moving_the_alias_changes_prepare_and_train_identity_and_the_same_version_keeps_it(store, tmp_path):
    client = store["client"]
    first = identities(store, tmp_path, "models:/crossmodal@champion")
    assert identities(store, tmp_path, "models:/crossmodal/1") == first  # what it names, not how
    try:
        client.set_registered_model_alias(NAME, "champion", "4")
        moved = identities(store, tmp_path, "models:/crossmodal@champion")
    finally:
        client.set_registered_model_alias(NAME, "champion", "1")
    changed = {name for name in first if first[name] != moved[name]}
    assert changed == {"prepare", "train", "evaluate"}, changed  # evaluate: its inputs changed
    assert identities(store, tmp_path, "models:/crossmodal@champion") == first


def test_a_reference_that_names_nothing_stops_the_plan_in_one_line(store, tmp_path):
    with pytest.raises(ModelNotFound) as err:
        identities(store, tmp_path, "models:/crossmodal@nobody")
    # Named as the key the user set, not as prepare.vocabulary_from, which follows it.
    assert str(err.value).startswith("train.init_from models:/crossmodal@nobody: ")
    assert "\n" not in str(err.value)
