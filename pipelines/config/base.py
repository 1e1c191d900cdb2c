"""The base of every config section, and sections built from the model library's dataclasses."""

from __future__ import annotations

import dataclasses
import typing

from pydantic import BaseModel, ConfigDict, Field, create_model

BOUNDS = ("ge", "gt", "le", "lt")


class Strict(BaseModel):
    """Unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AgreementError(ValueError):
    """Two sections disagree on a value they must share; `keys` are the dotted keys involved,
    so an error can name the `--set` that caused it."""

    def __init__(self, message: str, keys: tuple[str, ...]):
        super().__init__(message)
        self.keys = keys


def section_from_dataclass(source: type, name: str, doc: str) -> type[Strict]:
    """A config section whose keys, types, defaults and bounds are those of a dataclass of the
    model library (bounds in each field's metadata: {"ge": 0, "doc": "..."}), so the library
    stays the one place they are written."""
    hints = typing.get_type_hints(source)
    fields = {}
    for item in dataclasses.fields(source):
        bounds = {key: value for key, value in item.metadata.items() if key in BOUNDS}
        fields[item.name] = (hints[item.name], Field(item.default, description=item.metadata.get("doc"), **bounds))
    return create_model(name, __base__=Strict, __doc__=doc, **fields)
