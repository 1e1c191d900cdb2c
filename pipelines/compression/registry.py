"""Register a model folder in MLflow as a pyfunc model (see `pyfunc`) and point an alias at it.

    uri, version = register_model(folder, tags={"pipeline_run_id": ..., "config_hash": ...},
                                  metrics={"test/t2i_r1": 0.61}, run_id=register_run_id)
    # -> ("models:/crossmodal/3", 3); models:/crossmodal@challenger now names version 3

The model is logged into the given run (by id; else the active run) as "models from code": the
code is pipelines/compression/pyfunc.py, the weights the folder's own safetensors/ONNX files as
the artifact `model`. Nothing is pickled. Before a version is registered the logged model is
loaded back through MLflow and its input example predicted, so a registered version loads and
serves (`mlflow models serve -m models:/crossmodal@challenger --env-manager local`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from pipelines.errors import UserError

# What the served model imports; versions pinned from this environment. The crossmodal package
# itself is not on an index: serve with --env-manager local from an environment that has it.
RUNTIME_PACKAGES = ("mlflow", "torch", "numpy", "pandas", "pillow", "soundfile", "soxr", "safetensors", "pydantic")
QUANTIZED_PACKAGES = ("onnxruntime",)


class RegistrationError(UserError):
    """The folder cannot be registered (not a model folder, or the logged model does not load); one line."""


def register_model(
    folder: str | Path,
    *,
    name: str = "crossmodal",
    alias: str = "challenger",
    tags: dict | None = None,
    metrics: dict | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    safety=None,
) -> tuple[str, int]:
    """Log `folder` as a pyfunc model into the run, register a new version of `name`, point
    `alias` at it and tag it (`tags` as given, `metrics` as `metric.<name>`). `safety`: the
    content filter's SafetyConfig the served model applies (default: the shipped filter).
    Returns (models:/<name>/<version>, version)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines.compression import pyfunc
    from pipelines.inference.resolve import find_model_folder

    source = Path(folder)
    folder = find_model_folder(source) if source.is_dir() else None
    if folder is None:
        raise RegistrationError(f"{source}: not a model folder (no config.json)")
    tags = {str(k): str(v) for k, v in (tags or {}).items()}
    version_tags = {**tags, **{f"metric.{k}": repr(float(v)) for k, v in (metrics or {}).items()}}
    version_tags["crossmodal.format"] = folder_format(folder)

    with tracking(tracking_uri), inside_run(run_id) as run_id:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(pyfunc.__file__).resolve()),  # models from code: nothing pickled
            artifacts={"model": str(folder)},
            model_config={"safety": safety.model_dump()} if safety is not None else None,
            signature=pyfunc.signature(),
            input_example=pyfunc.input_example(),
            pip_requirements=pip_requirements(folder),
            tags=tags,
        )
        check_loads(info.model_uri, folder)
        # The registry by an explicit client: mlflow.register_model would ask the process-wide
        # registry URI, which a caller may have pinned elsewhere.
        client = MlflowClient(tracking_uri, registry_uri=tracking_uri) if tracking_uri else MlflowClient()
        try:
            client.create_registered_model(name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name, info.model_uri, run_id=run_id, tags=version_tags, model_id=info.model_id
        )
        client.set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}/{version.version}", int(version.version)


@contextmanager
def tracking(uri: str | None) -> Iterator[None]:
    """The process-wide tracking and registry URIs (which MLflow's model logging and loading
    read) set to `uri` for the block, then put back as they were, $MLFLOW_TRACKING_URI and
    $MLFLOW_REGISTRY_URI included (the setters write them)."""
    import os

    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    if uri is None:
        yield
        return
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = tracking_utils._tracking_uri, registry_utils._registry_uri, {n: os.environ.get(n) for n in names}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        registry_utils._registry_uri = before[1]
        for name, value in before[2].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def inside_run(run_id: str | None) -> Iterator[str]:
    """The run `run_id` (else the active run) made the active run for the block, its status put
    back after. MLflow 3.17 creates a logged model in the active run's experiment, or the
    default experiment when none is active, even if given a run id: so the run must be active."""
    import mlflow

    active = mlflow.active_run()
    if run_id is None or (active is not None and active.info.run_id == run_id):
        if active is None:
            raise RegistrationError("register_model: no MLflow run (pass run_id or call it inside a run)")
        yield active.info.run_id
        return
    status = mlflow.MlflowClient().get_run(run_id).info.status
    mlflow.start_run(run_id=run_id, nested=active is not None)
    try:
        yield run_id
    finally:
        mlflow.end_run(status=status)


def check_loads(model_uri: str, folder: Path) -> None:
    """Load the logged model through MLflow and embed its input example; RegistrationError if it
    fails or the embeddings are not of the model's size."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines.compression import pyfunc

    try:
        output = mlflow.pyfunc.load_model(model_uri).predict(pyfunc.input_example())
    except (MlflowException, OSError, ValueError) as err:
        message = " ".join(str(getattr(err, "message", err)).split())[:300]
        raise RegistrationError(f"{model_uri}: the logged model does not load and predict: {message}") from err
    size = json.loads((folder / "config.json").read_text())["model"]["embed_dim"]
    for modality in ("text", "image", "audio"):
        vectors = [v for v in output[f"{modality}_embedding"] if v is not None]
        if len(vectors) != 1 or len(vectors[0]) != size:
            raise RegistrationError(f"{model_uri}: the {modality} example gave no {size}-dim embedding")


def folder_format(folder: Path) -> str:
    """The folder's weights format: safetensors, or quantized:<the method quantized.json names>."""
    marker = folder / "quantized.json"
    if not marker.is_file():
        return "safetensors"
    try:
        meta = json.loads(marker.read_text())
    except ValueError:
        return "quantized"
    kind = (meta.get("method") or meta.get("kind") or meta.get("format")) if isinstance(meta, dict) else None
    return f"quantized:{kind}" if kind else "quantized"


def pip_requirements(folder: Path) -> list[str]:
    packages = RUNTIME_PACKAGES + (QUANTIZED_PACKAGES if (folder / "quantized.json").is_file() else ())
    pinned = []
    for package in packages:
        try:
            version = metadata.version(package).split("+")[0]  # torch's "+cpu" is no index version
        except metadata.PackageNotFoundError:
            continue
        pinned.append(f"{package}=={version}")
    return pinned
