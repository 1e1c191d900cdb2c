"""The `crossmodal` command: the pipeline's commands (pipelines/cli.py) and the ones that
operate it on a cluster (submit and manage Ray jobs, the nightly retrain, promotion).

The pipelines package stays usable without this one: `python -m pipelines` has every command
but these.
"""

from __future__ import annotations

import importlib
import sys

from pipelines import cli as pipelines_cli

# Each module: add_commands(subparsers) and COMMANDS {name: handler(args) -> exit code}.
EXTENSIONS = ("jobs.ray_jobs", "jobs.operate")


def extensions() -> list:
    return [importlib.import_module(name) for name in EXTENSIONS]


def build_parser():
    return pipelines_cli.build_parser(extensions())


def main(argv: list[str] | None = None) -> int:
    return pipelines_cli.main(argv, extensions())


if __name__ == "__main__":
    sys.exit(main())
