"""The README's commands, flags, config keys, paths and error examples exist as written."""

from __future__ import annotations

import importlib
import re
import shlex

import pytest

from jobs.cli import build_parser
from pipelines.config import ConfigError, PipelineConfig, load_config
from tests.conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
CODE_BLOCKS = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)
INLINE = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", README, flags=re.S))
SECTIONS = set(PipelineConfig.model_fields)


def command_lines(program: str) -> list[str]:
    """Lines of the code blocks, and inline code, that run `program` (comments cut off)."""
    lines = [line.split("  #")[0].strip() for block in CODE_BLOCKS for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines + INLINE if line.startswith(program + " ")]


def flags(line: str) -> list[str]:
    return [word.split("=")[0] for word in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", line)]


def test_it_stays_short_and_points_nowhere_outside_the_repository():
    assert len(README.splitlines()) < 250
    assert "../" not in README


def test_every_make_target_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = {m.group(1) for m in re.finditer(r"^([\w-]+):", makefile, flags=re.M)}
    used = {word for line in command_lines("make") for word in line.split()[1:2]}
    assert used and used <= targets, used - targets


def test_every_crossmodal_command_and_flag_exists():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    lines = command_lines("crossmodal")
    assert len(lines) >= 8
    for line in lines:
        name = line.split()[1]
        assert name in commands, line
        known = {option for action in commands[name]._actions for option in action.option_strings}
        assert set(flags(line)) <= known, (line, set(flags(line)) - known)


@pytest.mark.parametrize("module", ["jobs.nightly", "pipelines.training.standalone"])
def test_every_python_module_command_and_flag_exists(module, capsys):
    lines = [line for line in command_lines("python") + command_lines("torchrun") if f"-m {module}" in line]
    assert lines, module
    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    usage = capsys.readouterr().out
    for line in lines:
        own = line.split(f"-m {module}", 1)[1]
        assert all(flag in usage for flag in flags(own)), (line, usage)


def keys_in(text: str) -> list[list[str]]:
    """Dotted config keys: `train.model.{size,fusion}` -> [train, model, size], [train, model, fusion]."""
    if text.endswith((".yaml", ".yml", ".json", ".md", ".py")):  # a file name, e.g. `nightly.yaml`
        return []
    match = re.fullmatch(r"([a-z_]+(?:\.[a-z_0-9]+)*)(?:\.\{([a-z_,]+)\}|\.\*)?", text)
    if not match or match.group(1).split(".")[0] not in SECTIONS or "." not in text:
        return []
    base = match.group(1).split(".")
    return [base + [tail] for tail in match.group(2).split(",")] if match.group(2) else [base]


def table_keys() -> list[str]:
    """Keys of the config table: `| `section` | `key`, `sub.{a,b}` ... |` -> section.key, ..."""
    keys = []
    table = README.split("| section | what it sets |", 1)[1].split("\n\n", 1)[0]
    for section, cell in re.findall(r"^\| `([a-z_]+)` \| (.*) \|$", table, flags=re.M):
        keys += [f"{section}.{key}" for key in re.findall(r"`([a-z_][\w.{},*]*)`", cell) if section in SECTIONS]
    return keys


def test_every_config_key_exists():
    found = [keys for text in INLINE + table_keys() for keys in keys_in(text)]
    assert len(found) >= 40
    for keys in found:
        model = PipelineConfig
        for key in keys:
            assert key in model.model_fields, ".".join(keys)
            model = model.model_fields[key].annotation
            model = next((a for a in getattr(model, "__args__", ()) if hasattr(a, "model_fields")), model)


def test_every_repository_path_exists():
    paths = {
        text for text in INLINE if re.fullmatch(r"(pipelines|model|jobs|infra|docs|benchmarks|tests)/[\w./-]*", text)
    }
    assert len(paths) >= 10
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, missing


def test_the_shown_errors_are_the_ones_a_user_gets():
    shown = [line for block in CODE_BLOCKS for line in block.splitlines() if line.startswith("crossmodal: error: ")]
    assert len(shown) == 2
    for line in shown:
        message = line.removeprefix("crossmodal: error: ")
        if message.startswith("--set "):
            override = shlex.split(message.split(": ")[0])[1]
            source, overrides = REPO / "pipelines" / "configs" / "demo.yaml", [override]
        else:
            source, overrides = message.split(": ")[0], []
            text = (REPO / source).read_text().replace("samples_per_shard", "samples_per_shrd", 1)
            source = REPO / "broken.yaml"
            source.write_text(text)
        try:
            with pytest.raises(ConfigError) as caught:
                load_config(source, overrides)
        finally:
            if source.name == "broken.yaml":
                source.unlink()
        assert str(caught.value).endswith(message.split(": ", 1)[1]), (str(caught.value), message)
