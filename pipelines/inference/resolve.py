"""MODEL arguments: a model folder, an MLflow run, or a registered model.

    runs/storage/stages/train/<id>/model     a folder in the model library's format
    runs:/<run_id>/model                     an MLflow run's artifact folder
    <run_id>                                 the same, for a run that logged its model under model/
    models:/crossmodal@champion              a registered model by alias (or models:/name/3)

MLflow references are downloaded once into a cache folder (by URI) and loaded from there.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from model.io import SavedModel, load
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
    if not (folder / "config.json").is_file():
        raise ModelNotFound(f"{ref}: not a model folder (no config.json)")
    return folder


def download(uri: str, tracking_uri: str | None, cache: str | Path | None) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    target = (
        Path(cache or Path.home() / ".cache" / "crossmodal" / "models")
        / hashlib.sha256(f"{tracking_uri}|{uri}".encode()).hexdigest()[:16]
    )
    # Aliases move: a registered model is fetched every time, a run's artifacts never change.
    if uri.startswith("runs:/") and (target / "config.json").is_file():
        return target
    try:
        source = registered_source(uri, tracking_uri) if uri.startswith("models:/") else uri
        folder = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target), tracking_uri=tracking_uri)
        )
    except MlflowException as err:
        raise ModelNotFound(f"{uri}: {err.message.splitlines()[0]}") from err
    except OSError as err:
        raise ModelNotFound(f"{uri}: {err}") from err
    if not (folder / "config.json").is_file():
        nested = [p.parent for p in folder.rglob("config.json")]
        if len(nested) != 1:
            raise ModelNotFound(f"{uri}: the artifacts hold no model folder (no config.json)")
        folder = nested[0]
    return folder


def registered_source(uri: str, tracking_uri: str | None) -> str:
    """models:/<name>@<alias> or models:/<name>/<version> -> the artifact URI of that version.
    Resolved here because MLflow 3.17's download_artifacts ignores its registry_uri argument for
    models:/ URIs and asks the process-wide registry instead."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    name, _, rest = uri[len("models:/") :].partition("@")
    if rest:
        version = client.get_model_version_by_alias(name, rest)
    else:
        name, _, number = name.rpartition("/")
        if not name or not number.isdigit():
            raise ModelNotFound(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
        version = client.get_model_version(name, number)
    return version.source


def load_model(
    ref: str, tracking_uri: str | None = None, device: str = "cpu", cache: str | Path | None = None
) -> tuple[SavedModel, Path]:
    folder = model_folder(ref, tracking_uri, cache)
    try:
        return load(folder, device), folder
    except (ValueError, FileNotFoundError, OSError) as err:
        raise ModelNotFound(f"{ref}: cannot load the model: {str(err).splitlines()[0]}") from err
