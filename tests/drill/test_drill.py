"""The drill's quick cases in CI (marker `drill`); `make drill` runs these and the slow faults."""

from __future__ import annotations

import pytest

from tests.drill.case import table
from tests.drill.registry import all_drills

QUICK = [pytest.param(d, id=d.name, marks=[pytest.mark.ray] if d.needs_ray else []) for d in all_drills() if not d.slow]


@pytest.mark.drill
@pytest.mark.parametrize("drill", QUICK)
def test_drill(drill, tmp_path, request):
    if drill.needs_ray:
        request.getfixturevalue("ray_cluster")
    rows = drill.run(tmp_path)
    assert rows, f"{drill.name} reported no case"
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n" + table(failed)
