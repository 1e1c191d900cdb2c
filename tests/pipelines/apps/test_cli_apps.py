"""The applications end to end through the `crossmodal` CLI, on a tiny model trained here:
index (real Ray Data), search in every direction, caption, answer, MLflow model references,
the content filter, and the one-line errors for bad input."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
import yaml
from mlflow import MlflowClient

from model.config import model_config
from model.io import SavedModel, save
from model.multimodal import CrossModalModel
from model.objectives import LossWeights, MultiTaskObjective
from model.tokenizer import Tokenizer
from pipelines.cli import main
from pipelines.data.demo_world import ANSWERS
from tests.model.demo_data import batch_of, corpus, memorise, world_for
from tests.pipelines.data.prepare_helpers import BAD_SAMPLES, add

SAMPLES, STEPS = 24, 300
# Every test here uses a model trained for 300 steps first (about a minute and a half).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model that has memorised 24 demo samples (retrieval, captions, answers), saved."""
    torch.manual_seed(0)
    cfg = model_config("tiny")
    world = world_for(cfg, seed=11, missing_image=0.0, missing_audio=0.0)
    tokenizer = Tokenizer.train(corpus(world, 300), vocab_size=512)
    cfg = model_config("tiny", vocab_size=tokenizer.vocab_size, num_answers=len(ANSWERS))
    batch = batch_of(world, range(SAMPLES), tokenizer, cfg)
    model = CrossModalModel(cfg)
    objective = MultiTaskObjective(
        LossWeights(matching=0, masked_text=0, masked_image=0, masked_audio=0, answer=0), modality_dropout=0.5
    )  # captions and answers from one modality too
    memorise(model, batch, objective, STEPS)
    root = tmp_path_factory.mktemp("apps")
    folder = save(SavedModel(model.eval(), tokenizer, list(ANSWERS)), root / "model")
    records = [world.sample(i) for i in range(SAMPLES)]
    files = root / "files"
    files.mkdir()
    with tarfile.open(root / "corpus.tar", "w", format=tarfile.GNU_FORMAT) as archive:
        for r in records:
            for ext, field in (("jpg", "image"), ("txt", "text"), ("wav", "audio"), ("json", "json")):
                add(archive, f"{r['key']}.{ext}", r[field])
        BAD_SAMPLES["truncated_image"](archive)  # counted as quarantined, not indexed
    for r in records[:4]:
        (files / f"{r['key']}.jpg").write_bytes(r["image"])
        (files / f"{r['key']}.wav").write_bytes(r["audio"])
    return {
        "model": str(folder),
        "root": root,
        "files": files,
        "records": records,
        "captions": [r["text"].decode() for r in records],
        "meta": [json.loads(r["json"]) for r in records],
    }


@pytest.fixture(scope="module")
def index(trained, ray_cluster):
    folder = trained["root"] / "index"
    assert main(["index", trained["model"], str(trained["root"] / "corpus.tar"), "-o", str(folder)]) == 0
    return folder


def run_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_index_holds_every_modality_and_counts_the_quarantined(index):
    meta = json.loads((index / "index.json").read_text())
    assert meta["samples"] == SAMPLES and meta["modalities"] == {"text": SAMPLES, "image": SAMPLES, "audio": SAMPLES}
    assert meta["quarantined"] == {"truncated_image": 1}
    assert (index / "image.f32").stat().st_size == SAMPLES * meta["embed_dim"] * 4


@pytest.mark.parametrize("sample", [0, 3])
def test_search_finds_the_same_sample_in_every_other_modality(trained, index, capsys, sample):
    key, files = trained["records"][sample]["key"], trained["files"]
    queries = {
        "text": ["--text", trained["captions"][sample]],
        "image": ["--image", str(files / f"{key}.jpg")],
        "audio": ["--audio", str(files / f"{key}.wav")],
    }
    for modality, query in queries.items():
        results = run_json(capsys, "search", trained["model"], str(index), *query, "-k", "5")
        assert set(results) == {"text", "image", "audio"} - {modality}
        for hits in results.values():
            assert len(hits) == 5 and hits[0]["key"] == key
            scores = [h["score"] for h in hits]
            assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0


def test_caption_and_answer(trained, capsys):
    key, meta = trained["records"][2]["key"], trained["meta"][2]
    for ext in ("jpg", "wav"):
        result = run_json(capsys, "caption", trained["model"], str(trained["files"] / f"{key}.{ext}"))
        assert result["text"] == trained["captions"][2] and not result["blocked"]
        assert result["source"] == ("image" if ext == "jpg" else "audio")
    answer = run_json(capsys, "answer", trained["model"], str(trained["files"] / f"{key}.jpg"), meta["question"])
    assert answer["text"] == meta["answer"] and 0 < answer["score"] <= 1


def test_the_content_filter_withholds_a_caption_through_the_cli(trained, tmp_path, capsys):
    key = trained["records"][2]["key"]
    banned = trained["meta"][2]["objects"][0]["shape"]  # a word the caption contains
    config = tmp_path / "filter.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "mlflow": {"local_store": str(tmp_path / "runs")},
                "evaluate": {"safety": {"blocklist": [banned.upper()]}},
            }
        )
    )
    capsys.readouterr()
    assert main(["caption", trained["model"], str(trained["files"] / f"{key}.jpg"), "--config", str(config)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "[withheld by the content filter]"
    assert f"blocklist: {banned.upper()}" in out.err and trained["captions"][2] not in out.out


def test_model_from_an_mlflow_run_and_a_registered_alias(trained, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("apps", artifact_location=str(tmp_path / "artifacts")))
    run_id = run.info.run_id
    client.log_artifacts(run_id, trained["model"], "model")
    client.set_terminated(run_id)
    client.create_registered_model("crossmodal")
    version = client.create_model_version("crossmodal", f"runs:/{run_id}/model", run_id=run_id)
    client.set_registered_model_alias("crossmodal", "champion", version.version)
    image = str(trained["files"] / f"{trained['records'][1]['key']}.jpg")
    for ref in (f"runs:/{run_id}/model", run_id, "models:/crossmodal@champion"):
        result = run_json(capsys, "caption", ref, image, "--tracking-uri", uri)
        assert result["text"] == trained["captions"][1], ref


def test_bad_input_gets_one_line_errors(trained, index, tmp_path, capsys):
    model, image = trained["model"], str(trained["files"] / f"{trained['records'][0]['key']}.jpg")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("plain text, not a picture")
    other = save(
        SavedModel(
            CrossModalModel(model_config("tiny", vocab_size=trained_vocab(model))), Tokenizer.load(model), list(ANSWERS)
        ),
        tmp_path / "other",
    )
    cases = [
        (["caption", model, str(tmp_path / "missing.jpg")], "missing.jpg: no such file"),
        (["caption", model, str(not_an_image)], "notes.png: not a usable image"),
        (["caption", model, str(tmp_path)], "no such file"),
        (["caption", model, str(trained["root"] / "corpus.tar")], "not an image or audio file"),
        (["answer", model, image, "   "], "question: empty question"),
        (["search", model, str(index), "--text", ""], "empty text"),
        (["search", str(other), str(index), "--text", "a red circle"], "built by another model"),
        (["search", model, str(tmp_path), "--text", "a red circle"], "not an index"),
        (["caption", str(tmp_path / "nowhere"), image], "no such model folder"),
        (
            ["caption", "models:/nothing@champion", image, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
            "models:/nothing@champion",
        ),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("crossmodal: error: ") and message in err and "\n" not in err, (argv, err)


def trained_vocab(model_folder: str) -> int:
    return json.loads(open(f"{model_folder}/config.json").read())["model"]["vocab_size"]


def test_a_model_folder_needs_no_tracking_store_and_leaves_no_runs_folder(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pipelines.apps.cli import settings

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = SimpleNamespace(config=None, tracking_uri=None, model=str(tmp_path / "model"))
    assert settings(folder)[0] is None
    assert not (tmp_path / "runs").exists()
    registered = SimpleNamespace(config=None, tracking_uri=None, model="models:/crossmodal@champion")
    assert settings(registered)[0] == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
