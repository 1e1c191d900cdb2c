"""What a drill is and what it reports: one row per case of the table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Row:
    case: str  # short name, unique in the table
    done: str  # what was done to the pipeline
    expected: str  # what must happen
    outcome: str  # what did happen, in a few words
    passed: bool
    samples_in: int | None = None
    samples_out: int | None = None
    quarantined: int | None = None


@dataclass(frozen=True)
class Drill:
    """One scenario: `run(scratch)` does it in a fresh folder and returns its rows.

    Several cases may share one run (all bad-input kinds go through one pipeline run), so a
    drill returns a list. `slow` drills run in `make drill` only, not in CI's pytest."""

    name: str
    group: str  # "bad input", "bad config", "fault", "security", "logs"
    run: Callable[[Path], list[Row]]
    slow: bool = False
    needs_ray: bool = False  # runs inside the drill's one local Ray cluster


def count(value: int | None) -> str:
    return "" if value is None else str(value)


def table(rows: list[Row]) -> str:
    """The drill's table as Markdown (the README's reliability section quotes it)."""
    head = "| case | done | expected | outcome | in | out | quarantined | result |\n|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r.case} | {r.done} | {r.expected} | {r.outcome} | {count(r.samples_in)} | {count(r.samples_out)} "
        f"| {count(r.quarantined)} | {'pass' if r.passed else '**FAIL**'} |\n"
        for r in rows
    )
    return head + body
