"""Fan a list of work units out as Ray tasks, with a progress bar on the driver."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray
from ray.experimental import tqdm_ray


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
    bar = tqdm_ray.tqdm(total=len(refs), desc=desc)
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
