"""Samples/s of the prepare pipeline (Ray Data) against webdataset + torch DataLoader.

    python benchmarks/data_throughput.py [--samples 3000] [--workers 2] [--epochs 2]

Both sides read the same shards (demo world, written by this script through the real ingest
and shard stages, then the prepare stage for the tokenizer and balancing plan) and run the
same decode and augmentation code (pipelines.data.transforms) with the same number of
worker processes: Ray Data capped at `workers` CPUs, the DataLoader with `workers` workers.
Ray Data also balances (resamples) the stream, which the baseline does not. Each side runs
`epochs` timed passes after a full warm-up pass (imports, worker start-up).
Prints samples/s of each, their ratio (target >= 1.0) and the peak resident memory of each
side's processes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipelines  # noqa: F401  (project environment first)


class PeakRSS:
    """Samples the summed RSS of a set of processes in a background thread."""

    def __init__(self, select):
        self.select, self.peak, self._stop = select, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, sum(rss(pid) for pid in self.select()))


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def processes(match) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if match(int(entry.name), (entry / "cmdline").read_bytes()):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def ray_workers_and_me() -> list[int]:
    return [os.getpid()] + processes(lambda pid, cmd: cmd.startswith(b"ray::"))


def my_children_and_me() -> list[int]:
    me = os.getpid()

    def child(pid, _cmd):
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == me
        except (OSError, IndexError):
            return False

    return [me] + processes(child)


def make_shards(root: Path, samples: int):
    from pipelines.config import load_config
    from pipelines.runner import run_pipeline

    demo = Path(__file__).resolve().parent.parent / "pipelines" / "configs" / "demo.yaml"
    cfg = load_config(
        demo,
        [
            f"storage.root={root / 'storage'}",
            f"mlflow.local_store={root / 'runs'}",
            f"ingest.demo.num_samples={samples}",
            "shard.splits={train: 1.0}",
        ],
    )
    outcome = run_pipeline(cfg, only=["ingest", "shard", "prepare"], echo=lambda line: None)
    if outcome.status != "FINISHED":
        raise SystemExit(f"data_throughput: making the shards failed: {outcome.failure}")
    return outcome.by_name()["prepare"].output_uri


def timed_epochs(one_epoch, epochs: int) -> tuple[float, int, list[float]]:
    """A full warm-up pass, then `epochs` timed passes: (samples/s, samples, seconds per epoch).

    The warm-up runs to the end on purpose: an iteration abandoned half-way leaves Ray Data
    finishing its in-flight tasks in the background, which would be charged to the next pass."""
    one_epoch(100)  # worker start-up and imports (albumentations, nlpaug, librosa)
    total, times = 0, []
    for epoch in range(epochs):
        start = time.perf_counter()
        total += one_epoch(epoch)
        times.append(time.perf_counter() - start)
    return total / sum(times), total, times


def ray_pipeline(spec, epochs: int) -> tuple[float, int, list[float]]:
    from pipelines.data.dataset import build_dataset

    def one_epoch(epoch):
        return sum(
            len(batch["weight"])
            for batch in build_dataset(spec, "train", epoch=epoch).iter_batches(batch_size=32, batch_format="numpy")
        )

    return timed_epochs(one_epoch, epochs)


def dataloader_pipeline(spec, workers: int, epochs: int) -> tuple[float, int, list[float]]:
    import numpy as np
    import torch
    import webdataset as wds

    from pipelines.data.transforms import augment_batch, decode_row, tensor_batch
    from pipelines.storage import Storage

    settings = spec.settings
    urls = [Storage(u).path() for u in spec.shards["train"]]

    def record(sample):
        image_ext = next((e for e in ("jpg", "png", "webp") if e in sample), None)
        audio_ext = next((e for e in ("wav", "flac") if e in sample), None)
        return {
            "key": sample["__key__"],
            "image": sample.get(image_ext),
            "image_ext": image_ext,
            "text": sample.get("txt"),
            "audio": sample.get(audio_ext),
            "audio_ext": audio_ext,
            "json": sample.get("json"),
            "cls": sample.get("cls"),
        }

    def decode(sample):
        return dict(decode_row(record(sample), settings), key=sample["__key__"])

    def collate(rows, combine=False):
        out = {}
        for name in rows[0]:
            values = [r[name] for r in rows]
            out[name] = np.stack(values) if isinstance(values[0], np.ndarray) else np.array(values, dtype=object)
        out["has_image"], out["has_text"], out["has_audio"] = (
            out[n].astype(bool) for n in ("has_image", "has_text", "has_audio")
        )
        out["audio_len"] = out["audio_len"].astype(np.int32)
        return out

    def make_loader(epoch):
        pipeline = (
            wds.WebDataset(
                urls, shardshuffle=False, empty_check=False, nodesplitter=None, workersplitter=wds.split_by_worker
            )
            .map(decode)
            .select(lambda row: not row["reason"])
            .batched(32, collation_fn=collate)
            .map(lambda b: augment_batch(b, spec.augment, spec.seed, epoch, settings.sample_rate))
            .map(lambda b: tensor_batch(b, spec.tokenizer_json, tuple(spec.answers), spec.max_text_len))
        )
        return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=False)

    def one_epoch(epoch):
        return sum(len(batch["weight"]) for batch in make_loader(epoch))

    return timed_epochs(one_epoch, epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()

    import ray

    from pipelines.data.dataset import DatasetSpec, limit_data_cpus
    from pipelines.storage import Storage

    with tempfile.TemporaryDirectory() as tmp:
        prepare_uri = make_shards(Path(tmp), args.samples)
        spec = DatasetSpec(**Storage(prepare_uri).read_json("dataset_spec.json"))
        limit_data_cpus(args.workers)
        with PeakRSS(ray_workers_and_me) as ray_memory:
            ray_rate, ray_count, ray_times = ray_pipeline(spec, args.epochs)
        ray.shutdown()
        with PeakRSS(my_children_and_me) as loader_memory:
            loader_rate, loader_count, loader_times = dataloader_pipeline(spec, args.workers, args.epochs)
    print(
        f"shards: {args.samples} demo samples (small demo config), {args.workers} worker processes, "
        f"{args.epochs} timed epochs after a warm-up"
    )
    print(
        f"ray data (decode + augment + balance): {ray_rate:8.1f} samples/s  ({ray_count} samples), "
        f"peak RSS {ray_memory.peak / 2**20:,.0f} MiB, epochs {', '.join(f'{t:.1f}' for t in ray_times)} s"
    )
    print(
        f"webdataset + DataLoader (decode + augment): {loader_rate:8.1f} samples/s  ({loader_count} samples), "
        f"peak RSS {loader_memory.peak / 2**20:,.0f} MiB, epochs {', '.join(f'{t:.1f}' for t in loader_times)} s"
    )
    print(f"ratio ray data / DataLoader: {ray_rate / loader_rate:.2f}  (target >= 1.0)")


if __name__ == "__main__":
    main()
