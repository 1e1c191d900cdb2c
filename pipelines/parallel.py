"""Fan a list of work units out as Ray tasks, with their progress on the driver: a bar on a
terminal, a line every so often in a log (`pipelines.env.progress_mode`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
from ray.experimental import tqdm_ray

from pipelines import env


class LineProgress:
    """tqdm's update/close, as a printed line at most every `every` seconds and one at the end:
    a log gets a few lines, not a redrawn bar (carriage returns) per update."""

    def __init__(self, total: int, desc: str, every: float = env.PROGRESS_LINE_EVERY_S):
        self.total, self.desc, self.every = total, desc, every
        self.done, self.started = 0, time.monotonic()
        self.last = self.started

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            print(f"{self.desc}: {self.done}/{self.total} ({now - self.started:.0f} s)", flush=True)

    def close(self) -> None:
        print(f"{self.desc}: {self.done}/{self.total} done in {time.monotonic() - self.started:.1f} s", flush=True)


def progress(total: int, desc: str):
    """A progress bar for a terminal, else progress lines (the driver decided which)."""
    return tqdm_ray.tqdm(total=total, desc=desc) if env.progress_mode() == "bars" else LineProgress(total, desc)


def map_tasks(fn: Callable[..., Any], units: list, *, desc: str, num_cpus: float = 1.0, **kwargs) -> list:
    """fn(unit, **kwargs) for every unit as a Ray task; results in the order of `units`.

    Tasks must be idempotent (they write to a path derived from their unit): Ray retries a
    task whose worker or node died.
    """
    if not units:
        return []
    remote = ray.remote(num_cpus=num_cpus, max_retries=2, retry_exceptions=False)(fn)
    shared = {name: ray.put(value) for name, value in kwargs.items()}
    refs = [remote.remote(unit, **shared) for unit in units]
    bar = progress(len(refs), desc)
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)  # raise the first failure now, not after every task ran
            bar.update(len(done))
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise
    finally:
        bar.close()
    return ray.get(refs)
