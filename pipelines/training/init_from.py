"""Starting from a model (`train.init_from`, `prepare.vocabulary_from`, pinned by the runner):
the float model folder a reference names, and the checks that its weights and vocabulary fit
what the stage trains."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.io import SavedModel
from model.tokenizer import FILENAME as TOKENIZER_FILE
from model.tokenizer import Tokenizer
from pipelines.compression.folder import is_quantized
from pipelines.dag import StageError
from pipelines.data.dataset import DatasetSpec
from pipelines.inference.pin import TRAINED_TAG, find_version, is_registered, is_storage
from pipelines.inference.resolve import ModelNotFound, find_model_folder, model_folder
from pipelines.storage import Storage


def float_folder(ref: str, tracking_uri: str | None) -> Path:
    """A local folder of the float model `ref` names: for a registered version its
    crossmodal.trained_model tag's folder when it has one (an INT8 version's float model), else
    the version's own. ModelNotFound (one line) when there is none, or it is quantized."""
    if is_registered(ref) and not ref.startswith("models:/m-"):
        version = find_version(ref, tracking_uri)
        trained = version.tags.get(TRAINED_TAG)
        if trained:
            return storage_folder(trained, f"{ref}: its {TRAINED_TAG} tag, {trained},")
        folder = model_folder(ref, tracking_uri)
        if is_quantized(folder):
            raise ModelNotFound(
                f"{ref}: version {version.version} of {version.name} is quantized (INT8), which cannot be "
                f"trained, and has no {TRAINED_TAG} tag naming the float model it was made from: start from that"
            )
        return folder
    folder = storage_folder(ref, ref) if is_storage(ref) else model_folder(ref, tracking_uri)
    if is_quantized(folder):
        raise ModelNotFound(f"{ref}: a quantized (INT8) model cannot be trained: start from the float model")
    return folder


def storage_folder(uri: str, what: str) -> Path:
    store = Storage(uri)
    found = find_model_folder(store.local_copy()) if store.exists() else None
    if found is None:
        raise ModelNotFound(f"{what} names no model folder (no config.json)")
    return found


def saved_vocabulary(folder: Path) -> tuple[Tokenizer, list[str]]:
    """A model folder's tokenizer and answer list, without loading its weights."""
    if not (folder / TOKENIZER_FILE).is_file():  # else the tokenizers library's "No such file (os error 2)"
        raise ModelNotFound(f"{folder}: not a model folder (no {TOKENIZER_FILE})")
    return Tokenizer.load(folder), list(json.loads((folder / "config.json").read_text()).get("answers", []))


def check_vocabulary(saved: SavedModel, spec: DatasetSpec, where: str) -> None:
    """The prepared token ids and answer indices must be the model's own (prepare took them
    from the same reference; a mismatch means the two were pinned to different models)."""
    if saved.tokenizer.to_json() != spec.tokenizer_json or list(saved.answers) != list(spec.answers):
        raise StageError(
            f"{where}: the prepared data's tokenizer or answer list is not this model's: prepare.vocabulary_from "
            "must name the same model (leave it out: it follows train.init_from)"
        )


def check_fits(have: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor of the model to train (`want`) is in the starting weights (`have`) with the
    same shape, and nothing more; else a StageError naming the first that is not."""
    for name, tensor in want.items():
        if name not in have:
            raise StageError(f"{where}: tensor {name} of train.model is not in the model")
        if have[name].shape != tensor.shape:
            raise StageError(
                f"{where}: tensor {name} is {list(have[name].shape)} in the model, {list(tensor.shape)} in train.model"
            )
    extra = [name for name in have if name not in want]
    if extra:
        raise StageError(f"{where}: tensor {extra[0]} of the model is not in train.model ({len(extra)} such)")
