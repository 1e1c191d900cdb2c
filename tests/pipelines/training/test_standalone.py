"""The standalone launcher's user mistakes: one line naming the file or the override, exit 2."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pipelines.training.standalone import main
from tests.conftest import DEMO_CONFIG

PROG = "python -m pipelines.training.standalone"


RAY_WORKER_LINE = re.compile(r"\(\S+ pid=\d+(, ip=[\d.]+)?\) ")


def error_of(capsys, tmp_path, spec, *overrides) -> str:
    with pytest.raises(SystemExit) as caught:
        main(
            [
                "--spec",
                str(spec),
                "--config",
                str(DEMO_CONFIG),
                "--out",
                str(tmp_path / "out"),
                *[f"--set={o}" for o in overrides],
            ]
        )
    assert caught.value.code == 2
    # The session's Ray cluster forwards its workers' late lines ("(TrainController pid=N) ...",
    # from an earlier test's training) to this process's stderr: not the command's output.
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not RAY_WORKER_LINE.match(line)]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_missing_spec_is_named(capsys, tmp_path):
    spec = tmp_path / "nope.json"
    assert (
        error_of(capsys, tmp_path, spec) == f"{PROG}: {spec}: cannot read the dataset spec (No such file or directory)"
    )


@pytest.mark.parametrize(
    "text, detail",
    [
        ("{not json", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
        ('{"seed": 0}', "shards: Field required"),
    ],
)
def test_a_file_that_is_not_a_spec_is_named(capsys, tmp_path, text, detail):
    spec = tmp_path / "spec.json"
    spec.write_text(text)
    assert (
        error_of(capsys, tmp_path, spec)
        == f"{PROG}: {spec}: not a dataset spec written by the prepare stage ({detail})"
    )


def test_overrides_are_checked_against_the_train_section_only(capsys, tmp_path):
    spec = tmp_path / "nope.json"
    assert (
        error_of(capsys, tmp_path, spec, "prepare.seed=1")
        == f"{PROG}: --set prepare.seed=1: only train.* keys apply here"
    )
    assert error_of(capsys, tmp_path, spec, "train.precision=fp8").startswith(
        f"{PROG}: --set train.precision=fp8: train.precision: input should be "
    )


def chunk(first: int, rows: int) -> dict:
    ids = np.arange(first, first + rows)
    return {
        "sample_id": ids,
        "weight": np.ones(rows, np.float32),
        "image": np.tile(ids[:, None], (1, 3)).astype(np.uint8),
    }


@pytest.mark.parametrize("drop_last, sizes", [(True, [4, 4, 4]), (False, [4, 4, 4, 1])])
def test_rebatch_cuts_chunks_of_any_length_into_exact_batches_in_order(drop_last, sizes):
    from pipelines.training.standalone import rebatch

    chunks = [chunk(0, 3), chunk(3, 6), chunk(9, 1), chunk(10, 3)]
    batches = list(rebatch(iter(chunks), 4, drop_last))
    assert [len(b["weight"]) for b in batches] == sizes
    assert torch.cat([b["sample_id"] for b in batches]).tolist() == list(range(sum(sizes)))
    assert all(torch.equal(b["image"][:, 0], b["sample_id"].to(torch.uint8)) for b in batches)
    # Each batch owns its storage: no view into a joined tensor travels through a worker queue.
    assert all(b["image"].untyped_storage().nbytes() == b["image"].numel() for b in batches)


@pytest.mark.spawn
def test_loader_workers_hand_over_the_micro_batches_the_stream_would_give_in_process():
    from pipelines.training.standalone import MicroBatches

    class Chunks(torch.utils.data.IterableDataset):
        train = True

        def __iter__(self):  # each worker its own chunks, as ShardStream splits shards
            info = torch.utils.data.get_worker_info()
            worker = info.id if info else 0
            return iter([chunk(100 * worker + 10 * i, 5) for i in range(3)])

    def rows(workers: int) -> list[list[int]]:
        loader = torch.utils.data.DataLoader(MicroBatches(Chunks(), 4), batch_size=None, num_workers=workers)
        return sorted(b["sample_id"].tolist() for b in loader)

    assert rows(0) == [[0, 1, 2, 3], [4, 10, 11, 12], [13, 14, 20, 21]]
    assert rows(2) == sorted(rows(0) + [[i + 100 for i in r] for r in rows(0)])


def agree_worker(rank: int, port: int, out: str) -> None:
    import json
    import os

    import torch.distributed as dist

    from pipelines.training.loop import agreed_max, control_group, in_lockstep

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    group = control_group()
    taken = [list(in_lockstep(iter(range(3 + 2 * rank)), group)) for _ in range(2)]  # rank 1 has 2 more
    clock = agreed_max(10.0 + rank, group)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"taken": taken, "clock": clock}, f)
    dist.destroy_process_group()


@pytest.mark.spawn
def test_ranks_agree_on_the_clock_and_stop_together_on_a_cpu_control_group(tmp_path):
    import json

    import torch.multiprocessing as mp

    from tests.conftest import free_port

    mp.spawn(agree_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"taken": [[0, 1, 2], [0, 1, 2]], "clock": 11.0}  # twice: the group stays usable
