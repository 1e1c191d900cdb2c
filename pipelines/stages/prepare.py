"""Prepare: decode every shard once on Ray Data, quarantine what is unusable, learn the tokenizer
and the answer vocabulary (or take a model's: `vocabulary_from`), plan the modality balancing,
and describe the streaming dataset the train workers consume (`dataset_spec.json`; see
pipelines.data.dataset).

Outputs: dataset_spec.json, tokenizer.json, answers.json, quarantine.jsonl, balance.json,
plots/balance.png, plots/augmentation_preview.png, and with `materialize`, decoded Parquet
per split (then training reads it instead of decoding again).
Invariant, checked here and tested: samples in = samples usable + samples quarantined.
"""

from __future__ import annotations

import json
import posixpath
import time
from collections import Counter, defaultdict

from model.tokenizer import Tokenizer
from pipelines.config.prepare import PrepareConfig
from pipelines.dag import StageContext, StageError, StageResult
from pipelines.data.augment import negative_captions
from pipelines.data.balance import expected_counts, loss_weights, multiplicities
from pipelines.data.dataset import DatasetSpec, build_dataset, limit_data_cpus, read_decoded
from pipelines.data.decode import DecodeSettings
from pipelines.data.profile import Finding, data_profile, prepare_findings
from pipelines.data.report import augmentation_preview, balance_histogram
from pipelines.data.transforms import augment_batch, decode_row
from pipelines.data.wds_reader import read_tar
from pipelines.errors import UserError
from pipelines.storage import Storage
from pipelines.training.init_from import float_folder, saved_vocabulary

SUMMARY_FIELDS = (
    "key",
    "source",
    "split",
    "reason",
    "member",
    "detail",
    "combo",
    "caption",
    "question",
    "answer",
    "audio_seconds",
)


def decode_settings(cfg: PrepareConfig) -> DecodeSettings:
    return DecodeSettings(
        cfg.image_size,
        cfg.max_image_pixels,
        cfg.sample_rate,
        cfg.max_audio_seconds,
        cfg.max_text_chars,
        cfg.min_image_side,
    )


def prepare(cfg: PrepareConfig, ctx: StageContext) -> StageResult:
    limit_data_cpus(cfg.data_cpus)
    index_uri = ctx.inputs["shard"].outputs["index"]
    index = Storage(index_uri).read_json()
    root = posixpath.dirname(index_uri)
    shards = {
        split: [Storage(root).child(s["path"]).uri for s in info["shards"]] for split, info in index["splits"].items()
    }
    if not shards.get("train"):
        raise StageError("prepare: the shard index has no train shards")
    findings = [empty_split(split) for split, files in shards.items() if not files]
    shards = {split: files for split, files in shards.items() if files}
    spec = DatasetSpec(
        shards=shards,
        decode=decode_settings(cfg).__dict__,
        tokenizer_json="",
        answers=[],
        max_text_len=cfg.max_text_len,
        augment=cfg.augment,
        multiplicity={},
        weights={},
        seed=cfg.seed,
        member_limit=cfg.member_limit,
        batch_size=cfg.batch_size,
        data_cpus=cfg.data_cpus,
    )
    if cfg.materialize:
        spec = spec.model_copy(update={"materialized": materialize(spec, ctx.output)})
    rows = summarize(spec)

    quarantined = [r for r in rows if r["reason"]]
    usable = [r for r in rows if not r["reason"]]
    if len(rows) != len(usable) + len(quarantined):  # pragma: no cover - a broken invariant is a bug
        raise AssertionError("samples in != samples out + quarantined")
    ctx.output.write_bytes(
        "".join(
            json.dumps({k: r[k] for k in ("key", "source", "member", "reason", "detail")}) + "\n" for r in quarantined
        ).encode(),
        "quarantine.jsonl",
    )
    train = [r for r in usable if r["split"] == "train"]
    if not train:
        raise StageError("prepare: no usable train samples (see quarantine.jsonl)")
    # A split whose every sample was quarantined streams nothing: the spec leaves it out.
    unusable = [split for split in spec.shards if split != "train" and not any(r["split"] == split for r in usable)]
    findings += [empty_split(split) for split in unusable]
    spec = spec.model_copy(update={"shards": {s: f for s, f in spec.shards.items() if s not in unusable}})
    profile = data_profile(usable)
    findings += prepare_findings(cfg, profile, negatable(cfg, train))
    for finding in findings:
        print(f"prepare: warning: {finding}")

    tokenizer, answers = vocabulary(cfg, train, ctx)
    ctx.output.write_bytes(tokenizer.to_json().encode(), "tokenizer.json")
    ctx.output.write_json(answers, "answers.json")
    unknown = unknown_answers(train, answers)
    if unknown and cfg.vocabulary_from:
        findings.append(
            Finding(
                "prepare.vocabulary_from",
                f"{unknown} train questions have an answer outside the model's {len(answers)}: they train "
                "every task but VQA (their question is left out)",
            )
        )
        print(f"prepare: warning: {findings[-1]}")

    plan = balance_plan(cfg, train)
    ctx.output.write_json(plan, "balance.json")
    ctx.output.write_bytes(
        balance_histogram(plan["before"], plan["after_epoch0"], cfg.balance.target), "plots", "balance.png"
    )

    spec = spec.model_copy(
        update={
            "tokenizer_json": tokenizer.to_json(),
            "answers": answers,
            "multiplicity": plan["multiplicity"],
            "weights": plan["weights"],
            "profile": profile,
        }
    )
    ctx.output.write_json(profile, "profile.json")
    ctx.output.write_json(spec.model_dump(mode="json"), "dataset_spec.json")
    preview_rows = preview(spec, cfg, ctx.output)
    first_batch = consumer_check(spec)

    reasons = Counter(r["reason"] for r in quarantined)
    per_split = Counter(r["split"] for r in usable)
    metrics = {
        "samples_in": len(rows),
        "samples_usable": len(usable),
        "quarantined": len(quarantined),
        "vocab_size": tokenizer.vocab_size,
        "answers": len(answers),
        "answers.out_of_vocabulary": unknown,
        "first_batch_seconds": first_batch,
        "warnings": len(findings),
    }
    metrics |= {f"quarantined.{reason}": n for reason, n in reasons.items()}
    metrics |= {f"samples.{split}": n for split, n in per_split.items()}
    metrics |= {f"balance.before.{c}": n for c, n in plan["before"].items()}
    metrics |= {f"balance.after.{c}": n for c, n in plan["after_epoch0"].items()}
    print(
        f"prepare: {len(rows)} samples in, {len(usable)} usable, {len(quarantined)} quarantined {dict(reasons) or ''}; "
        f"vocabulary {tokenizer.vocab_size}, {len(answers)} answers; first batch in {first_batch:.1f} s"
    )
    out = ctx.output.uri
    return StageResult(
        outputs={
            "spec": f"{out}/dataset_spec.json",
            "tokenizer": f"{out}/tokenizer.json",
            "quarantine": f"{out}/quarantine.jsonl",
        },
        metrics=metrics,
        summary={
            "usable": dict(per_split),
            "quarantined": dict(reasons),
            "answers": len(answers),
            "warnings": [str(f) for f in findings],
        },
        tables={
            "quarantine": [{k: r[k] for k in ("key", "source", "member", "reason", "detail")} for r in quarantined][
                :5000
            ],
            "augmentation_texts": preview_rows,
            "warnings": [f.as_row() for f in findings],
        },
        artifacts={
            "plots/balance.png": f"{out}/plots/balance.png",
            "plots/augmentation_preview.png": f"{out}/plots/augmentation_preview.png",
            "balance.json": f"{out}/balance.json",
            "profile.json": f"{out}/profile.json",
        },
    )


def vocabulary(cfg: PrepareConfig, train: list[dict], ctx: StageContext) -> tuple[Tokenizer, list[str]]:
    """The tokenizer and the answer list: the model's that `vocabulary_from` names (a model
    fine-tunes on the token ids and answer indices it was trained with), else learned from the
    train split (the `max_answers` most frequent answers)."""
    if cfg.vocabulary_from:
        try:
            return saved_vocabulary(float_folder(cfg.vocabulary_from, ctx.tracking_uri))
        except UserError as err:
            raise StageError(f"prepare.vocabulary_from {err}") from None
    tokenizer = Tokenizer.train(
        [t for r in train for t in (r["caption"], r["question"], r["answer"]) if t], cfg.vocab_size
    )
    asked = Counter(r["answer"] for r in train if r["answer"] and r["question"])
    return tokenizer, [a for a, _ in asked.most_common(cfg.max_answers)]


def unknown_answers(train: list[dict], answers: list[str]) -> int:
    """Train questions whose answer is not in the answer list: out of vocabulary, as the
    stream treats them (pipelines.data.transforms.tensor_batch: no VQA target, question left out)."""
    known = set(answers)
    return sum(1 for r in train if r["answer"] and r["question"] and r["answer"] not in known)


def empty_split(split: str) -> Finding:
    return Finding(
        "shard.splits",
        f"the {split} split has no usable sample (too little data for its fraction): "
        f"what needs it ({'validation' if split == 'val' else 'scoring on it'}) is skipped",
    )


def negatable(cfg: PrepareConfig, train: list[dict]) -> int:
    """Train captions the negative-caption table can change (0 when negatives are off)."""
    if cfg.augment.negatives.p <= 0:
        return 0
    always = cfg.augment.negatives.model_copy(update={"p": 1.0})
    return sum(1 for r in train if r["caption"] and negative_captions(r["caption"], always, 0))


def materialize(spec: DatasetSpec, out: Storage) -> dict[str, str]:
    """Decode each split once into Parquet (quarantine rows included, with their reason)."""
    folders = {}
    for split in spec.shards:
        target = out.child("materialized", split)
        read_decoded(spec, split, None).write_parquet(target.path(), filesystem=target.fs)
        folders[split] = target.uri
    return folders


def summarize(spec: DatasetSpec) -> list[dict]:
    """The small facts of every sample: one decode pass over every split on Ray Data."""
    rows = []
    for split in spec.shards:
        ds = read_decoded(spec, split, None).select_columns(list(SUMMARY_FIELDS))
        for batch in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            rows += [dict(zip(SUMMARY_FIELDS, values)) for values in zip(*(batch[f] for f in SUMMARY_FIELDS))]
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in rows]


def balance_plan(cfg: PrepareConfig, train: list[dict]) -> dict:
    before = Counter(r["combo"] for r in train)
    mult = multiplicities(dict(before), cfg.balance.target)
    keys = defaultdict(list)
    for r in train:
        keys[r["combo"]].append(r["key"])
    after = expected_counts(keys, mult, cfg.seed, epoch=0)
    return {
        "before": dict(before),
        "target": cfg.balance.target,
        "multiplicity": mult,
        "after_epoch0": after,
        "weights": loss_weights(after, cfg.balance.loss_weights),
    }


def preview(spec: DatasetSpec, cfg: PrepareConfig, out: Storage) -> list[dict]:
    """A few train samples before and after augmentation (epoch 0), as a PNG grid and a table."""
    shard = Storage(spec.shards["train"][0])
    settings = spec.settings
    samples = []
    with shard.fs.open_input_stream(shard.path()) as stream:
        for item in read_tar(stream, shard.uri, spec.member_limit):
            if isinstance(item, dict):
                decoded = decode_row(item, settings)
                if not decoded["reason"]:
                    samples.append(dict(decoded, key=item["key"]))
            if len(samples) == cfg.preview_samples:
                break
    if not samples:
        return []
    batch = {name: _column([s[name] for s in samples]) for name in samples[0]}
    after = augment_batch(batch, spec.augment, spec.seed, 0, settings.sample_rate)
    augmented = [{name: after[name][i] for name in after} for i in range(len(samples))]
    out.write_bytes(augmentation_preview(samples, augmented, settings.sample_rate), "plots", "augmentation_preview.png")
    return [{"key": s["key"], "text_before": s["text"], "text_after": a["text"]} for s, a in zip(samples, augmented)]


def _column(values):
    import numpy as np

    if isinstance(values[0], np.ndarray):
        return np.stack(values)
    return np.array(values, dtype=object if isinstance(values[0], str) else None)


def consumer_check(spec: DatasetSpec) -> float:
    """Seconds until the first model-ready batch of the train stream arrives (it must)."""
    started = time.perf_counter()
    batch = next(iter(build_dataset(spec, "train").iter_torch_batches(batch_size=8)), None)
    if batch is None or batch["text_ids"].ndim != 2 or batch["image"].ndim != 4:
        raise StageError("prepare: the train stream yielded no model-ready batch")
    return time.perf_counter() - started
