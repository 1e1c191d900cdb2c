"""Model references pinned when a run is planned (`train.init_from`, `prepare.vocabulary_from`).

A reference may name different weights tomorrow: an alias moves to a new version, a folder is
written over. A stage's identity must follow what it names now, so the runner pins every
reference before it computes any identity, and the stage then reads the pinned reference:

    models:/<name>@<alias>    -> models:/<name>/<version> (and that version's float-model tag)
    models:/<name>/<version>  -> itself (a version's source never changes)
    runs:/<run id>/<path>     -> itself (a run's artifacts never change)
    a folder, a storage URI   -> its absolute location, and a sha256 of its files
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines.inference.resolve import RUN_ID, ModelNotFound, registered_version
from pipelines.storage import Storage

# A registered version's tag naming the float model folder (a storage URI) it was compressed
# from: an INT8 version cannot be trained, its float model can.
TRAINED_TAG = "crossmodal.trained_model"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Pin:
    ref: str  # what the stage reads: no alias, no relative path
    digest: str  # what its identity follows beyond `ref`: a folder's content, a version's tag


def is_registered(ref: str) -> bool:
    return ref.startswith("models:/")


def is_run(ref: str) -> bool:
    return ref.startswith("runs:/") or bool(RUN_ID.match(ref))


def is_storage(ref: str) -> bool:
    """A URI of a folder on some filesystem (file://, s3://, ...), not an MLflow reference."""
    return "://" in ref and not is_registered(ref) and not is_run(ref)


def pin(ref: str, tracking_uri: str | None) -> Pin:
    """What `ref` names now. ModelNotFound (one line) when it names nothing."""
    if is_registered(ref):
        return pin_version(ref, tracking_uri)
    if is_run(ref):
        return Pin(ref, ref)
    if is_storage(ref):
        return Pin(ref, folder_digest(Storage(ref), ref))
    folder = Path(ref).expanduser().resolve()
    if not folder.is_dir():
        raise ModelNotFound(f"{ref}: no such model folder")
    return Pin(str(folder), folder_digest(Storage(str(folder)), ref))


def pin_version(ref: str, tracking_uri: str | None) -> Pin:
    if ref.startswith("models:/m-"):  # a logged model's id: one set of artifacts
        return Pin(ref, ref)
    version = find_version(ref, tracking_uri)
    concrete = f"models:/{version.name}/{version.version}"
    return Pin(concrete, f"{concrete} {TRAINED_TAG}={version.tags.get(TRAINED_TAG, '')}")


def find_version(ref: str, tracking_uri: str | None):
    """The registered ModelVersion `ref` names; ModelNotFound (one line) when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        return registered_version(client, ref)
    except MlflowException as err:
        raise ModelNotFound(f"{ref}: {err.message.splitlines()[0]}") from None


def folder_digest(store: Storage, ref: str) -> str:
    """sha256 over a folder's file names and bytes (read in chunks: weights may be large)."""
    files = store.list_files()
    if not files:
        raise ModelNotFound(f"{ref}: no such model folder (no files there)")
    digest = hashlib.sha256()
    for relative in files:
        digest.update(relative.encode() + b"\0")
        with store.open_read(relative) as stream:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def pin_section(section, keys: tuple[str, ...], pin_ref: Callable[[str], Pin], prefix: str):
    """(the section with each reference of `keys` pinned, {key: digest}); the error of a
    reference that names nothing is one line naming its key."""
    update, digests = {}, {}
    for key in keys:
        ref = getattr(section, key)
        if ref is None:
            continue
        try:
            pinned = pin_ref(ref)
        except ModelNotFound as err:
            raise ModelNotFound(f"{prefix}.{key} {err}") from None
        update[key], digests[key] = pinned.ref, pinned.digest
    return section.model_copy(update=update), digests
