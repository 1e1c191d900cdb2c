"""Reading a config: YAML plus `--set` overrides, validated by a pydantic model, every mistake one line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipelines.config.base import AgreementError
from pipelines.errors import UserError


class ConfigError(UserError):
    """A user mistake in a config file or override; the message is a single line."""


def read_tree(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict, list]:
    """The YAML file's mapping with the overrides applied, and (keys, text) of each override."""
    tree = read_yaml(Path(path))
    applied: list[tuple[list[str], str]] = []
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value, text)
        applied.append((keys, text))
    return tree, applied


def validate_as(model: type[BaseModel], tree: Any, source: str, applied=(), prefix: tuple[str, ...] = ()):
    """`model` validated from `tree`; errors name keys under `prefix` (the section the tree is)."""
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(" ; ".join(describe(e, source, applied, model, prefix) for e in err.errors())) from None


def load_section(path: str | os.PathLike, overrides: list[str] | tuple[str, ...], section: str):
    """One top-level section of a pipeline config (the standalone trainer reads `train`);
    overrides of other sections are errors."""
    from pipelines.config.pipeline import PipelineConfig

    model = PipelineConfig.model_fields[section].annotation
    tree, applied = read_tree(path, overrides)
    for keys, text in applied:
        if keys[0] != section:
            raise ConfigError(f"--set {text}: only {section}.* keys apply here")
    return validate_as(model, tree.get(section) or {}, str(path), applied, (section,))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'shard.samples_per_shard=64' -> (['shard', 'samples_per_shard'], 64); YAML typing of the value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"--set {text}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text}: value is not valid YAML ({_first_line(err)})") from None
    return key.strip().split("."), value


def apply_override(tree: dict, path: list[str], value: Any, text: str) -> None:
    node = tree
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(path[: depth + 1])
            raise ConfigError(f"--set {text}: {where} is a value, not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', None) or _first_line(err)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def describe(error: dict, source: str, applied, root: type[BaseModel], prefix: tuple[str, ...] = ()) -> str:
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, AgreementError):  # two sections disagree: blame the override of either key
        keys = [key.split(".") for key in cause.keys]
        origin = next(
            (
                f"--set {text}"
                for overridden, text in reversed(applied)
                if any(overridden[: len(k)] == k or k[: len(overridden)] == overridden for k in keys)
            ),
            source,
        )
        return f"{origin}: {cause}"
    loc = [*prefix, *(str(part) for part in error["loc"])]
    dotted = ".".join(loc) or "(top level)"
    # An override is to blame when its key and the error's location overlap, either way round:
    # a section-level rule (fractions summing to 1) reports the section, not the key that was set.
    origin = next(
        (f"--set {text}" for keys, text in reversed(applied) if loc[: len(keys)] == keys or keys[: len(loc)] == loc),
        source,
    )
    if error["type"] == "extra_forbidden":
        allowed = allowed_keys(root, loc[len(prefix) : -1])
        hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
        return f"{origin}: {dotted}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{origin}: {dotted}: required key is missing"
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{origin}: {dotted}: {message[0].lower()}{message[1:]}{shown}"


def allowed_keys(root: type[BaseModel], loc: list[str]) -> list[str]:
    """The field names of the model at a dotted location, for 'unknown key' messages."""
    model: Any = root
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return sorted(getattr(model, "model_fields", {}))


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
