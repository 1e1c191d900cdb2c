"""No load in the project's code can unpickle a file (shards, checkpoints, MLflow artifacts)."""

from __future__ import annotations

import random

import numpy as np
import torch

from tests.unsafe_loads import ALLOWED, scan, scan_file

UNSAFE = """
import pickle, yaml, joblib
import numpy as np
import pandas as pd
from torch import load as tload
import torch, mlflow
pickle.loads(b"")
yaml.load(text)
joblib.load("x")
np.load("x.npy", allow_pickle=True)
pd.read_pickle("x")
tload("x.pt")
torch.load("x.pt", weights_only=False)
mlflow.pytorch.load_model("runs:/x/model")
"""
SAFE = """
import yaml, torch
import numpy as np
yaml.load(text, Loader=yaml.SafeLoader)
yaml.safe_load(text)
np.load("x.npy")
torch.load("x.pt", weights_only=True)
"""


def test_the_scanner_finds_every_kind_of_unsafe_load(tmp_path):
    (tmp_path / "unsafe.py").write_text(UNSAFE)
    (tmp_path / "safe.py").write_text(SAFE)
    found = [(h.line, h.call) for h in scan_file(tmp_path / "unsafe.py", tmp_path)]
    assert found == [
        (7, "pickle.loads"),
        (8, "yaml.load"),
        (9, "joblib.load"),
        (10, "numpy.load"),
        (11, "pandas.read_pickle"),
        (12, "torch.load"),
        (13, "torch.load"),
        (14, "mlflow.pytorch.load_model"),
    ]
    assert scan_file(tmp_path / "safe.py", tmp_path) == []


def test_the_project_has_no_unsafe_load_outside_the_allow_list():
    unsafe, allowed = scan()
    assert unsafe == [], "\n".join(map(str, unsafe))
    assert {(h.path, h.call) for h in allowed} == set(ALLOWED)  # no stale entry


def test_rng_state_round_trips_without_pickle(tmp_path):
    from pipelines.training.engine import load_rng, save_rng

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # a cached Gaussian is part of numpy's state
    objective = torch.Generator().manual_seed(4)
    save_rng(tmp_path, 0, objective)
    expected = (random.random(), np.random.normal(), torch.rand(1).item(), torch.rand(1, generator=objective).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9), objective.manual_seed(9)
    assert load_rng(tmp_path, 0, objective)
    assert (random.random(), np.random.normal(), torch.rand(1).item(), torch.rand(1, generator=objective).item()) == (
        expected
    )
    torch.load(tmp_path / "rng-rank0.pt", weights_only=True)  # plain tensors and numbers only


def test_an_old_pickled_rng_state_is_refused_not_loaded(tmp_path):
    from pipelines.training.engine import load_rng

    torch.save({"numpy": np.random.get_state()}, tmp_path / "rng-rank0.pt")  # an ndarray: a pickle global
    assert load_rng(tmp_path, 0) is False
