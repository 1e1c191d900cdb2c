"""The Ray Data idle back-off sleeps only after a scheduling step in which nothing moved."""

from __future__ import annotations

from types import SimpleNamespace

import ray.data

from pipelines.data import executor
from pipelines.data.executor import IdleBackoff, install


class Op:
    def __init__(self, submitted, finished, taken):
        self.metrics = SimpleNamespace(
            num_tasks_submitted=submitted, num_tasks_finished=finished, num_outputs_taken=taken
        )


def fake_executor(*counts):
    """Like a StreamingExecutor: its topology maps each operator to its state."""
    return SimpleNamespace(_topology={Op(*c): None for c in counts})


def test_sleeps_only_when_no_task_or_output_moved(monkeypatch):
    naps = []
    monkeypatch.setattr(executor.time, "sleep", naps.append)
    callback = IdleBackoff()
    steps = [
        ((1, 0, 0), (0, 0, 0)),  # first step: nothing to compare with
        ((1, 0, 0), (0, 0, 0)),  # nothing moved -> sleep
        ((1, 1, 0), (0, 0, 0)),  # a task finished
        ((1, 1, 1), (0, 0, 0)),  # its output was taken downstream
        ((1, 1, 1), (1, 0, 0)),  # the next operator submitted a task
        ((1, 1, 1), (1, 0, 0)),
    ]  # back-pressured: nothing moved -> sleep
    for counts in steps:
        callback.on_execution_step(fake_executor(*counts))
    assert naps == [executor.IDLE_SLEEP_S, executor.IDLE_SLEEP_S]


def test_never_sleeps_when_the_executor_hides_its_metrics(monkeypatch):
    naps = []
    monkeypatch.setattr(executor.time, "sleep", naps.append)
    callback = IdleBackoff()
    for _ in range(3):
        callback.on_execution_step(SimpleNamespace())
    assert naps == []


def test_installed_once_on_the_data_context():
    ctx = ray.data.DataContext.get_current().copy()
    install(ctx)
    install(ctx)
    assert ctx.custom_execution_callback_classes.count(IdleBackoff) == 1
    assert IdleBackoff in ctx.execution_callback_classes  # what the executor instantiates
