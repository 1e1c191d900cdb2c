"""The registered pyfunc model: a tiny model (random weights) registered with alias challenger
loads through MLflow and predicts embeddings, captions and answers from text, base64 images and
base64 audio; malformed rows are MLflow bad requests with one line; the apps accept it."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from model.config import model_config
from model.io import SavedModel, save
from model.multimodal import CrossModalModel
from model.tokenizer import Tokenizer
from pipelines.apps.api import CrossModal
from pipelines.cli import main
from pipelines.compression.folder import load_any
from pipelines.compression.pyfunc import CrossModalPyfunc, example_files
from pipelines.compression.registry import RegistrationError, register_model, tracking
from pipelines.config.evaluate import SafetyConfig
from pipelines.data.demo_world import ANSWERS
from pipelines.inference.resolve import find_model_folder, model_folder
from tests.model.demo_data import corpus, world_for

MODEL = "models:/crossmodal@challenger"
TAGS = {"pipeline_run_id": "0123abcd", "config_hash": "c0ffee"}
METRICS = {"test/t2i_r1": 0.25, "test/bleu": 0.125}
WEIGHT_FILES = {".pkl", ".pt", ".pth", ".bin", ".ckpt", ".pickle", ".joblib"}
# MLflow's own schema enforcement, on pandas 3 (not our code).
pytestmark = pytest.mark.filterwarnings("ignore:Operation with range is deprecated")


# -- helpers shared with test_serve ------------------------------------------------------------
def tiny_model(folder: Path) -> Path:
    """A tiny model with random weights and a small tokenizer, saved as a model folder."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(corpus(world_for(model_config("tiny")), 40), vocab_size=300)
    cfg = model_config("tiny", vocab_size=tokenizer.vocab_size, num_answers=len(ANSWERS))
    return save(SavedModel(CrossModalModel(cfg).eval(), tokenizer, list(ANSWERS)), folder)


def new_run(root: Path) -> tuple[str, str]:
    """(tracking URI, run id) of a fresh sqlite store with one running run (the register stage's)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("register", artifact_location=(root / "artifacts").as_uri())
    return uri, client.create_run(experiment, run_name="register").info.run_id


def registered(root: Path, **options) -> dict:
    folder = tiny_model(root / "model")
    uri, run_id = new_run(root)
    model_uri, version = register_model(folder, tags=TAGS, metrics=METRICS, tracking_uri=uri, run_id=run_id, **options)
    return {"root": root, "folder": folder, "uri": uri, "run_id": run_id, "model_uri": model_uri, "version": version}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    return registered(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def files() -> dict:
    png, wav = example_files()
    return {"png": png, "wav": wav, "image": b64(png), "audio": b64(wav)}


@pytest.fixture(scope="module")
def served(store):
    with tracking(store["uri"]):
        return mlflow.pyfunc.load_model(MODEL)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    # The apps cache downloaded models under ~/.cache: keep each test's under its tmp_path.
    monkeypatch.setenv("HOME", str(tmp_path))


# -- tests -------------------------------------------------------------------------------------
def test_registered_model_predicts_every_task(store, served, files):
    rows = [
        {"text": "a red square"},
        {"task": "embed", "image": files["image"]},
        {"audio": files["audio"], "text": "a tone"},
        {"task": "caption", "image": files["image"]},
        {"task": "caption", "audio": files["audio"]},
        {"task": "answer", "image": files["image"], "question": "what colour is the square?"},
    ]
    out = served.predict(rows, params={"beam_size": 1, "max_len": 6})
    size = model_config("tiny").embed_dim
    assert len(out) == len(rows) and list(out["task"]) == ["embed"] * 3 + ["caption"] * 2 + ["answer"]
    given = [("text",), ("image",), ("audio", "text")]
    for i, modalities in enumerate(given):
        for m in ("text", "image", "audio"):
            vector = out[f"{m}_embedding"][i]
            if m in modalities:
                assert len(vector) == size and abs(np.linalg.norm(vector) - 1) < 1e-4, (i, m)
            else:
                assert vector is None, (i, m)
    for i in (3, 4):
        assert isinstance(out["caption"][i], str) and out["blocked"][i] is False and out["answer"][i] is None
    assert out["answer"][5] in ANSWERS and 0 < out["score"][5] <= 1 and out["blocked"][5] is False
    assert out["caption"][:3].isna().all() and out["text_embedding"][3:].isna().all()


def test_the_pyfunc_decodes_and_embeds_as_the_apps_do(store, served, files, tmp_path):
    app = CrossModal(load_any(store["folder"]), store["folder"])
    (tmp_path / "x.png").write_bytes(files["png"])
    (tmp_path / "x.wav").write_bytes(files["wav"])
    out = served.predict([{"image": files["image"]}, {"audio": files["audio"]}, {"text": "a red square"}])
    np.testing.assert_allclose(out["image_embedding"][0], app.embed_file(tmp_path / "x.png")[1], atol=1e-5)
    np.testing.assert_allclose(out["audio_embedding"][1], app.embed_file(tmp_path / "x.wav")[1], atol=1e-5)
    np.testing.assert_allclose(out["text_embedding"][2], app.embed_text(["a red square"])[0], atol=1e-5)
    caption = served.predict([{"task": "caption", "image": files["image"]}], params={"beam_size": 2, "max_len": 8})
    assert caption["caption"][0] == app.caption(tmp_path / "x.png", beam_size=2, max_len=8).text


def test_the_version_carries_the_alias_tags_and_no_pickled_weights(store):
    client = MlflowClient(store["uri"], registry_uri=store["uri"])
    version = client.get_model_version_by_alias("crossmodal", "challenger")
    assert int(version.version) == store["version"] and store["model_uri"] == f"models:/crossmodal/{version.version}"
    assert "challenger" in version.aliases and version.run_id == store["run_id"]
    assert {k: version.tags[k] for k in TAGS} == TAGS
    assert float(version.tags["metric.test/t2i_r1"]) == METRICS["test/t2i_r1"]
    assert version.tags["crossmodal.format"] == "safetensors"
    # The register run is left as it was (running: the stage ends it).
    assert client.get_run(store["run_id"]).info.status == "RUNNING"
    logged = [p for p in (store["root"] / "artifacts").rglob("*") if p.is_file()]
    names = {p.name for p in logged}
    assert {"MLmodel", "model.safetensors", "config.json", "tokenizer.json", "pyfunc.py"} <= names
    assert not [p for p in logged if p.suffix in WEIGHT_FILES], "pickled weights were logged"
    mlmodel = next(p for p in logged if p.name == "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "python_model.pkl" not in mlmodel
    assert {"input_example.json", "serving_input_example.json"} <= names


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"image": "not base64!"}, "row 0: image: not valid base64"),
        ({"image": b64(b"plain text, not a picture")}, "row 0: image: not a usable image (undecodable_image"),
        ({"audio": b64(b"RIFF....WAVEjunk")}, "row 0: audio: not a usable audio file"),
        ({"task": "caption", "text": "a red square"}, "row 0: caption: needs an image or audio"),
        ({"task": "answer", "question": "what?"}, "row 0: answer: needs an image"),
        ({"task": "translate", "text": "hi"}, "row 0: task: unknown task 'translate'"),
        ({"task": "embed"}, "row 0: embed: nothing to embed"),
    ],
)
def test_a_malformed_row_is_a_bad_request_with_one_line(served, row, reason):
    with pytest.raises(MlflowException) as caught:
        served.predict([row])
    err = caught.value
    assert err.error_code == "INVALID_PARAMETER_VALUE" and err.get_http_status_code() == 400
    assert err.message.startswith(reason) and "\n" not in err.message, err.message
    assert json.loads(err.serialize_as_json())["reason"] == err.message
    assert "Traceback" not in err.serialize_as_json()


def test_a_bad_row_among_good_ones_is_named_and_bad_params_are_refused(served, files):
    with pytest.raises(MlflowException, match=r"^row 2: image: not valid base64$"):
        served.predict([{"text": "a"}, {"image": files["image"]}, {"image": "%%%"}])
    with pytest.raises(MlflowException, match="beam_size must be an integer in"):
        served.predict([{"text": "a"}], params={"beam_size": 0})
    with pytest.raises(MlflowException, match="Incompatible input types for column text") as caught:
        served.predict([{"text": 5}])  # refused by MLflow's schema enforcement (in the server: by the model)
    assert caught.value.get_http_status_code() == 400


def test_the_apps_accept_the_registered_model(store, files, tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(files["png"])
    capsys.readouterr()
    assert main(["caption", MODEL, str(image), "--tracking-uri", store["uri"], "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["source"] == "image" and isinstance(result["text"], str)
    app = CrossModal.load(MODEL, tracking_uri=store["uri"])
    assert app.caption(image).text == result["text"]
    assert (app.folder / "config.json").is_file() and app.folder.is_relative_to(tmp_path)
    # The register run's model by run and by run id (runs:/ leads to MLflow 3's logged model).
    for ref in (f"runs:/{store['run_id']}/model", store["run_id"], store["model_uri"]):
        assert (model_folder(ref, store["uri"], tmp_path / "cache") / "model.safetensors").is_file(), ref


def test_a_moved_alias_loads_the_new_version_with_its_content_filter(tmp_path, files):
    first = registered(tmp_path / "a")
    uri, run_id = first["uri"], first["run_id"]
    image = tmp_path / "x.png"
    image.write_bytes(files["png"])
    before = CrossModal.load(MODEL, tracking_uri=uri).answer(image, "what is it?")
    assert not before.blocked
    # Version 2 of the same folder, served with a filter that withholds every text.
    _, version = register_model(first["folder"], tracking_uri=uri, run_id=run_id, safety=SafetyConfig(rules=["."]))
    assert version == 2
    with tracking(uri):
        out = mlflow.pyfunc.load_model(MODEL).predict(
            [{"task": "answer", "image": files["image"], "question": "what?"}]
        )
    assert out["blocked"][0] is True and out["answer"][0] == SafetyConfig().replacement and out["reason"][0]
    # The apps fetch the version the alias names now (the cache is keyed by version, not alias).
    moved = CrossModal.load(MODEL, tracking_uri=uri)
    assert moved.folder != CrossModal.load(f"models:/crossmodal/{first['version']}", tracking_uri=uri).folder


def test_register_refuses_what_it_cannot_register(store, tmp_path):
    client = MlflowClient(store["uri"], registry_uri=store["uri"])
    versions = len(client.search_model_versions("name = 'crossmodal'"))
    with pytest.raises(RegistrationError, match="not a model folder"):
        register_model(tmp_path / "nowhere", tracking_uri=store["uri"], run_id=store["run_id"])
    with pytest.raises(RegistrationError, match="no MLflow run"):
        register_model(store["folder"], tracking_uri=store["uri"])
    assert len(client.search_model_versions("name = 'crossmodal'")) == versions


def test_the_pyfunc_applies_the_content_filter_it_is_given(store, files):
    model = CrossModalPyfunc()
    context = SimpleNamespace(artifacts={"model": str(store["folder"])}, model_config={"safety": {"rules": ["."]}})
    model.load_context(context)
    out = model.predict(context, [{"task": "caption", "image": files["image"]}], params={"beam_size": 1, "max_len": 4})
    assert out["blocked"][0] is True and out["caption"][0] == SafetyConfig().replacement


@pytest.mark.parametrize(
    "route",
    ["torch_int8", pytest.param("onnx_int8", marks=pytest.mark.slow)],  # ONNX export: ~20-40 s
)
def test_a_quantized_folder_registers_loads_and_predicts(store, files, tmp_path, route):
    quantize = pytest.importorskip("pipelines.compression.quantize")
    if route == "onnx_int8":
        pytest.importorskip("onnxruntime")
    folder = quantize.save_quantized(quantize.quantize(load_any(store["folder"]), route), route, tmp_path / route)
    client = MlflowClient(store["uri"], registry_uri=store["uri"])
    run_id = client.create_run(client.get_run(store["run_id"]).info.experiment_id, run_name="register").info.run_id
    name = f"crossmodal-{route.replace('_', '-')}"
    model_uri, _ = register_model(folder, name=name, tags=TAGS, tracking_uri=store["uri"], run_id=run_id)
    version = client.get_model_version_by_alias(name, "challenger")
    assert version.tags["crossmodal.format"] == f"quantized:{route}"
    with tracking(store["uri"]):
        served = mlflow.pyfunc.load_model(f"models:/{name}@challenger")
    out = served.predict(
        [{"text": "a red square"}, {"image": files["image"]}, {"audio": files["audio"]}],
        params={"beam_size": 1},
    )
    size = model_config("tiny").embed_dim
    assert [len(out[f"{m}_embedding"][i]) for i, m in enumerate(("text", "image", "audio"))] == [size] * 3
    # The version's source is the logged model (models:/m-<id>); MLflow 3.17 leaves version.model_id None.
    location = client.get_logged_model(version.source.removeprefix("models:/")).artifact_location
    logged = list(Path(location.removeprefix("file://")).rglob("*"))
    assert "quantized.json" in {p.name for p in logged} and not [p for p in logged if p.suffix in WEIGHT_FILES]
    if route == "onnx_int8":
        assert {"text.onnx", "image.onnx", "audio.onnx"} <= {p.name for p in logged}
    app = CrossModal.load(model_uri, tracking_uri=store["uri"])
    assert (app.folder / "quantized.json").is_file() and len(app.fingerprint) == 16
    assert len(app.embed_text(["a red square"])[0]) == size


def test_model_folders_are_found_inside_pyfunc_layouts(tmp_path):
    folder = tiny_model(tmp_path / "pyfunc" / "artifacts" / "model")
    assert find_model_folder(folder) == folder
    assert find_model_folder(tmp_path / "pyfunc") == folder  # a pyfunc model's own folder
    assert find_model_folder(tmp_path) == folder  # a download of one
    assert model_folder(str(tmp_path / "pyfunc")) == folder
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    assert find_model_folder(tmp_path) is None  # two candidates: none is guessed
    assert isinstance(load_any(folder), SavedModel)


def test_an_answer_from_a_model_without_answers_is_a_bad_row(tmp_path, files):
    tokenizer = Tokenizer.train(["a red square", "a blue circle"], 300)
    folder = save(
        SavedModel(CrossModalModel(model_config("tiny", vocab_size=tokenizer.vocab_size)), tokenizer), tmp_path / "m"
    )
    model = CrossModalPyfunc()
    context = SimpleNamespace(artifacts={"model": str(folder)}, model_config=None)
    model.load_context(context)
    with pytest.raises(MlflowException, match=r"^row 1: answer: .* trained without answers") as caught:
        model.predict(context, [{"text": "a"}, {"task": "answer", "image": files["image"], "question": "what?"}])
    assert caught.value.get_http_status_code() == 400
