"""Bad inputs: every kind of bad sample or shard (tests/drill/bad_kinds.py), each among good
samples, through ONE real run of ingest (source: shards) -> shard -> prepare on Ray + MLflow.

Checked per kind from the stages' quarantine.jsonl files (ingest's, shard's, prepare's) and
the shard stage's tars: every good sample kept once (text byte for byte), every bad one
quarantined with its own key and the expected reason (or kept, where that is the documented
handling), nothing else quarantined, no planted pickle ever loaded, and the run finishes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tests.drill.bad_kinds import BUILDERS, KEPT, Kind
from tests.drill.case import Drill, Row

STAGES = ["ingest", "shard", "prepare"]


def overrides(scratch: Path, shards: Path) -> list[str]:
    from tests.conftest import small_overrides

    return small_overrides(scratch) + [
        "ingest.source=shards",
        f"ingest.path={shards}",
        "ingest.max_member_mb=16",  # the gzip bomb inflates past it; the 10 MB caption fits
        "shard.splits={train: 1.0}",
        "shard.samples_per_shard=1000",
        "prepare.image_size=32",
        "prepare.max_audio_seconds=0.5",
        "prepare.batch_size=32",
        "prepare.preview_samples=2",
        "prepare.data_cpus=2",
    ]


def read_quarantine(output_uri: str) -> list[dict]:
    from pipelines.storage import Storage

    out = Storage(output_uri)
    if not out.exists("quarantine.jsonl"):
        return []
    return [json.loads(line) for line in out.read_bytes("quarantine.jsonl").decode().splitlines() if line]


def shard_records(output_uri: str) -> list[dict]:
    """Every sample the shard stage wrote, as the reader gives it back."""
    from pipelines.data.wds_reader import read_tar
    from pipelines.storage import Storage

    out = Storage(output_uri)
    records = []
    for name in out.list_files(suffix=".tar"):
        with open(out.path(name), "rb") as stream:
            records += list(read_tar(stream, name, 1 << 30))
    return records


def run(scratch: Path) -> list[Row]:
    from mlflow import MlflowClient

    from pipelines.config import load_config
    from pipelines.runner import run_pipeline
    from tests.conftest import DEMO_CONFIG

    shards = scratch / "shards"
    shards.mkdir()
    kinds = [build(shards) for build in BUILDERS]
    cfg = load_config(DEMO_CONFIG, overrides(scratch, shards))
    outcome = run_pipeline(cfg, only=STAGES, echo=lambda line: None)
    stages = outcome.by_name()
    if outcome.status != "FINISHED":
        failure = outcome.failure
        return [Row("bad inputs run", "ingest..prepare over every kind", "the run finishes", f"{failure}", False)]

    rows = {stage: read_quarantine(stages[stage].output_uri) for stage in STAGES}
    written = shard_records(stages["shard"].output_uri)
    prepared = rows["prepare"]
    usable = Counter(r["key"] for r in written) - Counter(r["key"] for r in prepared)
    texts = {}
    for record in written:
        texts.setdefault(record["key"], record["text"])  # a duplicate's kept copy is the first
    found = Found(rows, usable, texts)
    table = [check(kind, found) for kind in kinds]
    metrics = MlflowClient(outcome.tracking_uri).get_run(stages["prepare"].run_id).data.metrics
    table.append(invariant(metrics, written, prepared))
    table.append(nothing_unexplained(kinds, rows))
    return table


class Found:
    """What the run did, indexed for the per-kind checks."""

    def __init__(self, rows: dict[str, list[dict]], usable: Counter, texts: dict):
        self.usable, self.texts = usable, texts
        self.by_source: dict[str, list[tuple[str, dict]]] = {}
        self.by_key: dict[str, list[tuple[str, dict]]] = {}
        for stage, found in rows.items():
            for row in found:
                if stage != "prepare":  # prepare's rows name its own shards as source
                    self.by_source.setdefault(Path(row["source"]).name, []).append((stage, row))
                self.by_key.setdefault(row["key"], []).append((stage, row))

    def quarantined(self, kind: Kind) -> list[tuple[str, dict]]:
        """This kind's quarantine rows: by its shard files (ingest, shard) or its keys (prepare)."""
        mine = [hit for shard in kind.shards for hit in self.by_source.get(shard.name, [])]
        keys = set(kind.good) | set(kind.bad)
        mine += [(stage, row) for key in keys for stage, row in self.by_key.get(key, []) if stage == "prepare"]
        return mine


def check(kind: Kind, found: Found) -> Row:
    quarantined = found.quarantined(kind)
    reasons: dict[str, list[str]] = {}
    for stage, row in quarantined:
        reasons.setdefault(row["key"], []).append(f"{row['reason']} ({stage})")
    problems = []
    for key, caption in kind.good.items():
        if found.usable[key] != 1:
            problems.append(f"good {key} usable {found.usable[key]}x")
        elif caption is not None and found.texts.get(key) != caption:
            problems.append(f"good {key} text changed")
    for key, reason in kind.bad.items():
        if reason == KEPT:
            if found.usable[key] != 1 or key in reasons:
                problems.append(f"{key} not kept: {reasons.get(key)}")
        elif [r.split(" ")[0] for r in reasons.get(key, [])] != [reason]:
            problems.append(f"{key}: {reasons.get(key) or 'not quarantined'}")
        elif found.usable[key] != (1 if key in kind.good else 0):
            problems.append(f"{key} usable {found.usable[key]}x")
    unexpected = [k for k in reasons if k not in kind.bad and k != ""]
    problems += [f"unexpected {k}: {reasons[k]}" for k in unexpected]
    shard_rows = [row for _, row in quarantined if row["key"] == ""]
    if len(shard_rows) != kind.shard_rows or any(r["reason"] != "unreadable_shard" for r in shard_rows):
        problems.append(f"shard-level rows {[(r['source'], r['reason']) for r in shard_rows]}")
    problems += [f"{m.name} exists: a member was unpickled" for m in kind.markers if m.exists()]

    said = [f"{k or Path(r['source']).name}: {r['reason']}" for _, r in quarantined for k in [r["key"]]]
    kept_bad = [k for k, reason in kind.bad.items() if reason == KEPT and found.usable[k] == 1]
    outcome = "; ".join(said + [f"{k} kept" for k in kept_bad]) or "nothing quarantined"
    good_kept = sum(found.usable[k] == 1 for k in kind.good)
    outcome += f"; {good_kept}/{len(kind.good)} good kept"
    if kind.markers:
        outcome += f"; marker {'absent' if not any(m.exists() for m in kind.markers) else 'PRESENT'}"
    if problems:
        outcome += " -- " + "; ".join(problems)
    extra = len(set(kind.bad) - set(kind.good))
    return Row(
        kind.case,
        kind.done,
        kind.expected,
        outcome,
        not problems,
        samples_in=len(kind.good) + extra,
        samples_out=good_kept + len(kept_bad),
        quarantined=len(quarantined),
    )


def invariant(metrics: dict, written: list[dict], prepared: list[dict]) -> Row:
    """prepare's own count: samples in = usable + quarantined, and in = what shard wrote."""
    n_in, usable, quarantined = (int(metrics[m]) for m in ("samples_in", "samples_usable", "quarantined"))
    ok = n_in == usable + quarantined and n_in == len(written) and quarantined == len(prepared)
    return Row(
        "prepare invariant",
        "count prepare's samples in, usable and quarantined",
        "in = usable + quarantined = samples the shard stage wrote",
        f"{n_in} = {usable} + {quarantined}; shard wrote {len(written)}, quarantine.jsonl has {len(prepared)}",
        ok,
        samples_in=n_in,
        samples_out=usable,
        quarantined=quarantined,
    )


def nothing_unexplained(kinds: list[Kind], rows: dict[str, list[dict]]) -> Row:
    """Every quarantine row of every stage belongs to some kind (no stray rejections)."""
    names = {shard.name for kind in kinds for shard in kind.shards}
    keys = {key for kind in kinds for key in (*kind.good, *kind.bad)}
    stray = [
        (stage, r["key"], r["reason"])
        for stage, found in rows.items()
        for r in found
        if not (r["key"] in keys or Path(r["source"]).name in names)
    ]
    total = sum(len(found) for found in rows.values())
    return Row(
        "every quarantine row explained",
        "match each quarantine row of ingest, shard and prepare to a kind",
        "no row outside the kinds",
        f"{total} rows, {len(stray)} stray" + (f": {stray[:5]}" if stray else ""),
        not stray,
        quarantined=total,
    )


DRILLS = [Drill("bad_inputs", "bad input", run, slow=False, needs_ray=True)]
