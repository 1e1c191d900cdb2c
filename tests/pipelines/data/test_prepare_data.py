"""The prepare pipeline on Ray Data: quarantine, fixtures, augmentation epochs, balancing."""

from __future__ import annotations

import shutil
from collections import Counter

import numpy as np
import pytest

from pipelines.data.balance import multiplicities
from pipelines.data.dataset import EpochClock, build_dataset, read_decoded
from pipelines.data.transforms import balance_batch
from tests.pipelines.data.prepare_helpers import BAD_SAMPLES, crafted_shard, spec_for


def decoded_rows(spec, split="train") -> list[dict]:
    rows = []
    for batch in (
        read_decoded(spec, split, None)
        .select_columns(["key", "reason", "member", "combo", "text", "label", "has_image", "has_text", "has_audio"])
        .iter_batches(batch_format="numpy")
    ):
        rows += [dict(zip(batch, values)) for values in zip(*batch.values())]
    return rows


def test_every_quarantine_reason_and_the_good_neighbours(tmp_path, ray_cluster):
    shard = tmp_path / "train" / "shard-0.tar"
    shard.parent.mkdir()
    good_keys = crafted_shard(shard)
    rows = decoded_rows(spec_for({"train": [str(shard)]}))
    quarantined = {r["reason"]: r for r in rows if r["reason"]}
    usable = [r for r in rows if not r["reason"]]
    assert set(quarantined) == set(BAD_SAMPLES)
    assert sorted(r["key"] for r in usable) == sorted(good_keys)
    assert len(rows) == len(usable) + len(quarantined) == len(good_keys) + len(BAD_SAMPLES)
    assert quarantined["truncated_image"]["member"] == "trunc.jpg"
    assert quarantined["pickle_member"]["member"] == "weights.pth"
    # And the model-ready stream carries exactly the good ones.
    streamed = build_dataset(spec_for({"train": [str(shard)]}), "train", augment=False, balance=False)
    assert streamed.count() == len(good_keys)


def test_fixture_shards_through_the_ray_data_reader(tmp_path, fixtures_dir, ray_cluster):
    folder = tmp_path / "train"
    shutil.copytree(fixtures_dir / "shards", folder)
    spec = spec_for({"train": sorted(str(p) for p in folder.iterdir())}, member_limit=64 << 20)
    rows = decoded_rows(spec)
    by_key = {r["key"]: r for r in rows}
    assert by_key["clip1"]["has_audio"] and by_key["clip1"]["has_text"] and not by_key["clip1"]["reason"]
    digits = [r for r in rows if r["key"].isdigit()]
    assert len(digits) == 90 and all(r["has_image"] and not r["has_text"] and r["label"].isdigit() for r in digits)
    assert "广州市房地产中介协会分析" in by_key["test/resources/dataset/aishell-BAC009S0724W0121"]["text"]
    reasons = Counter(r["reason"] for r in rows if r["reason"])
    assert reasons == {"empty_member": 2, "pickle_member": 3}
    assert len(rows) == 102


def test_augmentation_is_reproducible_and_fresh_each_epoch(tmp_path, ray_cluster):
    shard = tmp_path / "train" / "shard-0.tar"
    shard.parent.mkdir()
    crafted_shard(shard, reasons=())
    spec = spec_for({"train": [str(shard)]})

    def epoch_images(epoch):
        ds = build_dataset(spec, "train", epoch=epoch, balance=False)
        rows = sorted(
            (
                (int(b), img)
                for batch in ds.iter_batches(batch_format="numpy")
                for b, img in zip(batch["sample_id"], batch["image"])
            ),
            key=lambda t: t[0],
        )
        return np.stack([img for _, img in rows])

    first, again, second = epoch_images(0), epoch_images(0), epoch_images(1)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, second)
    clock = EpochClock.remote(0)
    ray_cluster.get(clock.set.remote(1))
    assert np.array_equal(epoch_images(clock), second)


def test_a_pass_of_several_epochs_streams_each_epoch_as_its_own_pass_would(tmp_path, ray_cluster):
    shard = tmp_path / "train" / "shard-0.tar"
    shard.parent.mkdir()
    keys = crafted_shard(shard, reasons=("truncated_image", "pickle_member"))
    spec = spec_for({"train": [str(shard)]})

    def images(first_epoch, epochs):  # {(epoch, sample_id): augmented image}, and the epochs in stream order
        ds = build_dataset(spec, "train", epoch=first_epoch, balance=False, epochs=epochs)
        out, order = {}, []
        for batch in ds.iter_batches(batch_format="numpy"):
            for epoch, sample_id, image in zip(batch["epoch"], batch["sample_id"], batch["image"]):
                out[(int(epoch), int(sample_id))] = image
                order.append(int(epoch))
        return out, order

    stream, order = images(0, epochs=3)
    assert order == sorted(order) and Counter(order) == {0: 3, 1: 3, 2: 3}  # epoch after epoch, the good samples only
    assert len(keys) == 3 and len(stream) == 9
    next_pass, _ = images(3, epochs=3)
    assert sorted({epoch for epoch, _ in next_pass}) == [3, 4, 5]  # the next pass continues the epoch count
    for epoch in range(3):  # the same images as a one-epoch pass of that epoch
        alone, _ = images(epoch, epochs=1)
        assert alone.keys() == {k for k in stream if k[0] == epoch}
        assert all(np.array_equal(alone[k], stream[k]) for k in alone)
    ids = {sample_id for _, sample_id in stream}
    assert any(not np.array_equal(stream[(0, i)], stream[(1, i)]) for i in ids)  # fresh augmentation per epoch


def test_balancing_reaches_the_target_mixture_on_10000_samples():
    rng = np.random.default_rng(0)
    combos = rng.choice(["image+text+audio", "image+text", "text+audio"], size=10_000, p=[0.8, 0.15, 0.05])
    target = {"image+text+audio": 0.4, "image+text": 0.3, "text+audio": 0.3}
    mult = multiplicities(dict(Counter(combos)), target)
    batch = {"key": np.array([f"k{i}" for i in range(10_000)], dtype=object), "combo": combos.astype(object)}
    out = balance_batch(batch, mult, {"text+audio": 2.0}, seed=3, epoch=0)
    shares = {c: n / len(out["combo"]) for c, n in Counter(out["combo"]).items()}
    for combo, share in target.items():
        assert shares[combo] == pytest.approx(share, abs=0.02)
    assert len(out["combo"]) == pytest.approx(10_000, rel=0.02)
    assert set(out["weight"][out["combo"] == "text+audio"]) == {2.0}
    other_epoch = balance_batch(batch, mult, {}, seed=3, epoch=1)
    assert not np.array_equal(out["key"][:500], other_epoch["key"][:500])  # fresh duplicates per epoch


def test_untargeted_combinations_keep_their_samples():
    mult = multiplicities({"image+text": 600, "text+audio": 200, "text": 200}, {"image+text": 0.5, "text+audio": 0.5})
    assert mult["text"] == 1.0
    expected = {c: mult[c] * n for c, n in {"image+text": 600, "text+audio": 200, "text": 200}.items()}
    assert sum(expected.values()) == pytest.approx(1000)
    assert expected["image+text"] == pytest.approx(expected["text+audio"])


def test_materialized_parquet_streams_the_same_samples(tmp_path, ray_cluster):
    from pipelines.stages.prepare import materialize
    from pipelines.storage import Storage

    shard = tmp_path / "train" / "shard-0.tar"
    shard.parent.mkdir()
    crafted_shard(shard, reasons=("truncated_image", "pickle_member"))
    spec = spec_for({"train": [str(shard)]})
    materialized = spec.model_copy(update={"materialized": materialize(spec, Storage(str(tmp_path / "out")))})
    assert Storage(materialized.materialized["train"]).list_files(suffix=".parquet")

    def rows(s):
        out = {}
        for batch in build_dataset(s, "train", epoch=2).iter_batches(batch_format="numpy"):
            for i, sample_id in enumerate(batch["sample_id"]):
                out.setdefault(int(sample_id), []).append({k: v[i] for k, v in batch.items()})
        return out

    direct, from_parquet = rows(spec), rows(materialized)
    assert direct.keys() == from_parquet.keys() and len(direct) == 3
    for sample_id, copies in direct.items():
        for a, b in zip(copies, from_parquet[sample_id]):
            for name in a:
                assert np.array_equal(a[name], b[name]), name
