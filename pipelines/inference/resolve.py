"""MODEL arguments: a model folder, an MLflow run, or a registered model.

    runs/storage/stages/train/<id>/model     a folder in the model library's format
    runs:/<run_id>/model                     an MLflow run's artifact folder
    <run_id>                                 the same, for a run that logged its model under model/
    models:/crossmodal@champion              a registered model by alias (or models:/name/3)

A folder may be the model library's folder (FP32 or pruned), a quantized folder (quantized.json)
or a pyfunc model holding either as an artifact (MLmodel + artifacts/model/config.json): the
model folder is found one or two levels down. MLflow references are downloaded once into a cache
folder (by URI) and loaded from there.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from model.io import SavedModel
from pipelines.compression.folder import load_any
from pipelines.errors import UserError

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class ModelNotFound(UserError):
    """The MODEL argument names nothing loadable; the message is one line."""


def model_folder(ref: str, tracking_uri: str | None = None, cache: str | Path | None = None) -> Path:
    """A local folder holding the model `ref` names (downloaded first for MLflow references)."""
    if ref.startswith(("runs:/", "models:/")) or RUN_ID.match(ref):
        uri = ref if not RUN_ID.match(ref) else f"runs:/{ref}/model"
        return download(uri, tracking_uri, cache)
    folder = Path(ref).expanduser()
    if not folder.exists():
        raise ModelNotFound(f"{ref}: no such model folder (or runs:/<run_id>/model, models:/<name>@<alias>)")
    found = find_model_folder(folder)
    if found is None:
        raise ModelNotFound(f"{ref}: not a model folder (no config.json)")
    return found


def find_model_folder(folder: Path) -> Path | None:
    """`folder` when it holds config.json, else the one folder up to three levels down that does:
    <run download>/model, <pyfunc>/artifacts/model, <download of a pyfunc>/artifacts/artifacts/model.
    None when there is none or several."""
    if (folder / "config.json").is_file():
        return folder
    if not folder.is_dir():
        return None
    nested = {p for depth in ("*", "*/*", "*/*/*") for p in folder.glob(f"{depth}/config.json")}
    return nested.pop().parent if len(nested) == 1 else None


def download(uri: str, tracking_uri: str | None, cache: str | Path | None) -> Path:
    import contextlib
    import os
    import shutil

    import mlflow
    from mlflow.exceptions import MlflowException

    root = Path(cache or Path.home() / ".cache" / "crossmodal" / "models")

    def slot(key: str) -> Path:
        return root / hashlib.sha256(f"{tracking_uri}|{key}".encode()).hexdigest()[:16]

    try:
        # A run's artifacts never change: cached by URI, found without asking MLflow. An alias
        # moves, but the version it names today does not: cached by what it resolves to, so a
        # moved alias fetches its new version into a new folder.
        if uri.startswith("runs:/") and (cached := find_model_folder(slot(uri))) is not None:
            return cached
        source = artifact_source(uri, tracking_uri)
        target = slot(uri if uri.startswith("runs:/") else source)
        if (cached := find_model_folder(target)) is not None:
            return cached
        # Downloaded beside the target and renamed into place: a folder there is always complete.
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(partial), tracking_uri=tracking_uri)
            if find_model_folder(target) is None:  # else another process got there first
                shutil.rmtree(target, ignore_errors=True)  # a stale folder without a model
                with contextlib.suppress(OSError):  # a process renaming at the same moment wins
                    partial.rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    except MlflowException as err:
        raise ModelNotFound(f"{uri}: {err.message.splitlines()[0]}") from err
    except OSError as err:
        raise ModelNotFound(f"{uri}: {err}") from err
    found = find_model_folder(target)
    if found is None:
        raise ModelNotFound(f"{uri}: the artifacts hold no model folder (no config.json)")
    return found


def artifact_source(uri: str, tracking_uri: str | None) -> str:
    """The artifact URI to download for a runs:/ or models:/ reference, resolved here because
    MLflow 3.17 resolves models:/ URIs (registered versions and logged models alike, also those a
    runs:/ URI leads to) against the process-wide tracking and registry URIs, ignoring the
    tracking_uri it is given."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if uri.startswith("models:/m-"):
        return client.get_logged_model(uri[len("models:/") :]).artifact_location
    if uri.startswith("models:/"):
        return logged_model_location(client, registered_source(client, uri))
    return logged_model_location(client, run_model_source(client, uri))


def registered_source(client, uri: str) -> str:
    """models:/<name>@<alias> or models:/<name>/<version> -> the source of that version."""
    return registered_version(client, uri).source


def registered_version(client, uri: str):
    """models:/<name>@<alias> or models:/<name>/<version> -> that ModelVersion (name, version,
    source, tags). MlflowException when there is none."""
    name, _, rest = uri[len("models:/") :].partition("@")
    if rest:
        return client.get_model_version_by_alias(name, rest)
    name, _, number = name.rpartition("/")
    if not name or not number.isdigit():
        raise ModelNotFound(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return client.get_model_version(name, number)


def run_model_source(client, uri: str) -> str:
    """runs:/<run_id>/<name>: the artifacts of the model logged as <name> by that run (MLflow 3
    keeps a logged model's artifacts apart from the run's) when there is one, else the run's
    artifact folder itself (a model folder logged with log_artifacts)."""
    run_id, _, path = uri[len("runs:/") :].partition("/")
    name, _, rest = path.partition("/")
    if not name:
        return uri
    experiment = client.get_run(run_id).info.experiment_id
    for model in client.search_logged_models([experiment], filter_string=f"name = '{name}'", max_results=100):
        if model.source_run_id == run_id:
            return f"models:/{model.model_id}" + (f"/{rest}" if rest else "")
    return uri


def logged_model_location(client, source: str) -> str:
    """A logged model's artifact location for models:/m-<id>[/path] (MLflow 3 registers a
    log_model version with that source); any other source unchanged."""
    if not source.startswith("models:/m-"):
        return source
    model_id, _, rest = source[len("models:/") :].partition("/")
    location = client.get_logged_model(model_id).artifact_location
    return f"{location.rstrip('/')}/{rest}" if rest else location


def load_model(
    ref: str, tracking_uri: str | None = None, device: str = "cpu", cache: str | Path | None = None
) -> tuple[SavedModel, Path]:
    folder = model_folder(ref, tracking_uri, cache)
    try:
        return load_any(folder, device), folder
    except (ValueError, FileNotFoundError, OSError) as err:
        raise ModelNotFound(f"{ref}: cannot load the model: {str(err).splitlines()[0]}") from err
