"""Every drill module, in the order the table lists them; each defines `DRILLS`."""

from __future__ import annotations

import importlib

from tests.drill.case import Drill

MODULES = (
    "tests.drill.bad_inputs",
    "tests.drill.bad_configs",
    "tests.drill.security",
    "tests.drill.logs",
    "tests.drill.faults_training",
    "tests.drill.faults_services",
)


def all_drills() -> list[Drill]:
    drills = [d for name in MODULES for d in importlib.import_module(name).DRILLS]
    names = [d.name for d in drills]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise ValueError(f"drill names must be unique: {sorted(duplicated)}")
    return drills
