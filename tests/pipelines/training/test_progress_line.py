"""The training's own progress line: steps done, the budget that ends training first, time left."""

from __future__ import annotations

import pytest

from pipelines.config.train import LoopConfig
from pipelines.training.loop import progress_line


@pytest.mark.parametrize(
    "max_steps, max_minutes, step, seconds, expected",
    [
        # the clock ends it first: 100 steps in 2 min is 450 in 9 min
        (100_000, 9.0, 100, 120.0, "train: step 100 of about 450 (9 min budget) | 2.0 of 9 min | about 7.0 min left"),
        # the steps end it first: 300 more at 1.2 s a step is 6 min, within the 9
        (400, 9.0, 100, 120.0, "train: step 100 of 400 | 2.0 of 9 min | about 6.0 min left"),
        (400, None, 100, 60.0, "train: step 100 of 400 | about 3.0 min left"),  # steps only
        (100_000, 9.0, 700, 520.0, "train: step 700 of about 727 (9 min budget) | 8.7 of 9 min | about 0.3 min left"),
        (100_000, 9.0, 700, 600.0, "train: step 700 of about 700 (9 min budget) | 10.0 of 9 min | about 0.0 min left"),
    ],
)
def test_progress_line_shows_the_budget_that_ends_training_first(max_steps, max_minutes, step, seconds, expected):
    cfg = LoopConfig(max_steps=max_steps, max_minutes=max_minutes)
    line = progress_line(cfg, step, seconds, loss=2.3101, samples_per_s=97.6)
    assert line == expected + " | loss 2.310 | 98 samples/s"


def test_the_pace_given_replaces_the_pace_so_far():
    # 100 steps in 120 s, but 1 step a second since the data started: 100 + 420 steps
    cfg = LoopConfig(max_steps=100_000, max_minutes=9.0)
    line = progress_line(cfg, 100, 120.0, loss=1.0, samples_per_s=64.0, pace=1.0)
    assert line.startswith("train: step 100 of about 520 (9 min budget) | 2.0 of 9 min | about 7.0 min left")


def test_a_logged_step_no_task_applied_to_stops_the_run_with_what_the_data_lacks():
    from pipelines.training.loop import check_applies

    check_applies({"loss.total": 1.5, "loss.vqa": 1.5, "loss.caption": float("nan")})
    with pytest.raises(ValueError, match="no objective applies to this batch: it needs two modalities"):
        check_applies({"loss.total": 0.0, "loss.vqa": float("nan"), "loss.caption": float("nan")})
