"""Ingest: bring samples into the pipeline as records (raw bytes per modality, in Parquet parts).

Sources: the bundled demo world, a folder of files grouped by key (img2dataset layout:
`key.jpg`, `key.txt`, `key.wav`, `key.json`), a JSONL manifest (paths to image/audio files,
text, question/answer), or existing WebDataset shards written by any tool. Samples that
cannot be taken safely are rejected whole with a reason and counted; nothing is decoded here.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.config.ingest import IngestConfig
from pipelines.dag import StageContext, StageError, StageResult
from pipelines.data.demo_world import DemoWorld
from pipelines.data.records import SCHEMA, combination, to_table
from pipelines.data.wds_reader import Member, Rejected, assemble, read_tar, split_name, unsafe_name
from pipelines.parallel import map_tasks
from pipelines.storage import Storage

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class Unit:
    """One Ray task's share of the source, written to one Parquet part."""

    part: int
    kind: str
    items: list  # demo: [start, stop]; shards: [file]; folder: [(key, [files])]; jsonl: [(line, entry)]


class StageInputError(StageError):
    """The user's data location is missing or unusable; a one-line message."""


def ingest(cfg: IngestConfig, ctx: StageContext) -> StageResult:
    units, rejected = plan_units(cfg)
    stats = map_tasks(write_part, units, desc="ingest parts", cfg=cfg, out=ctx.output)
    combos, reasons = Counter(), Counter(r["reason"] for r in rejected)
    samples = 0
    for part in stats:
        samples += part["samples"]
        combos.update(part["combinations"])
        reasons.update(r["reason"] for r in part["rejected"])
        rejected.extend(part["rejected"])
    for r in rejected:
        if r["reason"] == "unreadable_shard":
            print(f"ingest: warning: shard {r['source']} cannot be read ({r['detail']}); the other shards are read")
    ctx.output.write_bytes("".join(json.dumps(r) + "\n" for r in rejected).encode(), "quarantine.jsonl")
    ctx.output.write_json(
        {"source": cfg.source, "path": cfg.path, "files": source_listing(cfg) or []}, "source_index.json"
    )
    metrics = {"samples": samples, "rejected": len(rejected), "parts": len(units)}
    metrics |= {f"rejected.{reason}": n for reason, n in reasons.items()}
    metrics |= {f"samples.{combo}": n for combo, n in combos.items()}
    print(f"ingest: {samples} samples in {len(units)} parts, {len(rejected)} rejected {dict(reasons) or ''}")
    return StageResult(
        outputs={
            "parts": ctx.output.child("parts").uri,
            "quarantine": ctx.output.uri + "/quarantine.jsonl",
            "source_index": ctx.output.uri + "/source_index.json",
        },
        metrics=metrics,
        summary={"samples": samples, "rejected": dict(reasons), "combinations": dict(combos)},
        tables={"rejected": rejected[:5000]},
    )


def source_fingerprint(cfg: IngestConfig) -> str:
    """Digest of the user's data as the filesystem lists it (name, size, modification time):
    editing, adding or removing a file changes it."""
    if cfg.source == "demo":
        return ""
    listing = source_listing(cfg)
    if listing is None:
        return "missing"
    return hashlib.sha256(json.dumps([[f["path"], f["size"], f["mtime_ns"]] for f in listing]).encode()).hexdigest()


def source_listing(cfg: IngestConfig) -> list[dict] | None:
    """The source's files (path, size, modification time), sorted; None if the source is
    missing, [] for the demo world. For a manifest, the manifest itself and the files its lines
    name, not the folder around it: a manifest in a working directory would otherwise count
    the pipeline's own outputs there, which change while it runs. The ingest stage keeps it as
    `source_index.json`, so a later run can tell which files are new (the nightly does)."""
    if cfg.source == "demo":
        return []
    source = Storage(cfg.path)
    info = source.fs.get_file_info(source.path())
    if info.type == pafs.FileType.NotFound:
        return None
    if cfg.source == "jsonl" and info.is_file:
        files = [info, *manifest_media(source)]
    else:
        files = [info] if info.is_file else source.fs.get_file_info(pafs.FileSelector(source.path(), recursive=True))
    found = sorted((f.path, f.size, f.mtime_ns) for f in files if f.type == pafs.FileType.File)
    return [{"path": path, "size": size, "mtime_ns": mtime} for path, size, mtime in found]


def manifest_media(manifest: Storage) -> list[pafs.FileInfo]:
    """The files a manifest's lines name (image, audio), as the filesystem lists them."""
    base = Storage(posixpath.dirname(manifest.uri))
    uris = set()
    for line in manifest.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the stage itself rejects the line, with its reason
        for field in ("image", "audio"):
            if isinstance(entry, dict) and entry.get(field):
                path = str(entry[field])
                uri = path if "://" in path else base.child(path).uri
                if inside(base, Storage(uri)):  # never even stat a file outside the data root
                    uris.add(uri)
    infos = []
    for uri in sorted(uris):
        media = Storage(uri)
        infos.append(media.fs.get_file_info(media.path()))
    return infos


# -- planning: runs in the stage task, lists the source and cuts it into units ----------------
def plan_units(cfg: IngestConfig) -> tuple[list[Unit], list[dict]]:
    if cfg.source == "demo":
        n, step = cfg.demo.num_samples, cfg.samples_per_part
        return [Unit(i, "demo", [start, min(start + step, n)]) for i, start in enumerate(range(0, n, step))], []
    source = Storage(cfg.path)
    if not source.exists():
        raise StageInputError(f"ingest.path {cfg.path}: no such file or folder")
    try:
        return list_source(cfg, source)
    except PermissionError as err:  # a folder or manifest this user may not read: one line, not pyarrow's traceback
        raise StageInputError(
            f"ingest.path {cfg.path}: cannot read it ({err.strerror or 'permission denied'})"
        ) from None


def list_source(cfg: IngestConfig, source: Storage) -> tuple[list[Unit], list[dict]]:
    if cfg.source == "shards":
        files = shard_files(source)
        return [Unit(i, "shards", [f]) for i, f in enumerate(files)], []
    if cfg.source == "folder":
        groups = folder_groups(source)
        return chunk(groups, cfg.samples_per_part, "folder"), []
    entries, rejected = manifest_entries(source, cfg.path)
    return chunk(entries, cfg.samples_per_part, "jsonl"), rejected


def chunk(items: list, size: int, kind: str) -> list[Unit]:
    return [Unit(i, kind, items[start : start + size]) for i, start in enumerate(range(0, len(items), size))]


def shard_files(source: Storage) -> list[str]:
    if source.fs.get_file_info(source.path()).is_file:
        return [source.uri]
    files = [f for f in source.list_files() if f.endswith(SHARD_SUFFIXES)] + broken_links(source)
    if not files:
        raise StageInputError(f"ingest.path {source.uri}: no .tar/.tar.gz/.tgz shards found")
    return [source.child(f).uri for f in sorted(files)]


def broken_links(source: Storage) -> list[str]:
    """Shard names in a local folder that lead nowhere (a link to a missing file or a link loop):
    the filesystem listing leaves them out, so they would vanish without a word. Listed, they
    reach a read task, which quarantines each as `unreadable_shard` with one line."""
    if not isinstance(source.fs, pafs.LocalFileSystem):
        return []
    root = Path(source.path())
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.name.endswith(SHARD_SUFFIXES) and p.is_symlink() and not os.path.exists(p)
    )


def folder_groups(source: Storage) -> list[tuple[str, list[tuple[str, str]]]]:
    """key -> [(file URI, file name)], grouped by the WebDataset key rule."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for name in source.list_files():
        groups.setdefault(split_name(name)[0], []).append((source.child(name).uri, posixpath.basename(name)))
    if not groups:
        raise StageInputError(f"ingest.path {source.uri}: the folder has no files")
    return list(groups.items())


def manifest_entries(source: Storage, shown: str) -> tuple[list[tuple[int, dict]], list[dict]]:
    if not source.fs.get_file_info(source.path()).is_file:
        raise StageInputError(f"ingest.path {shown}: a JSONL manifest must be a file")
    entries, rejected = [], []
    text = source.read_bytes().decode("utf-8", errors="replace")
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError(f"expected an object, got {type(entry).__name__}")
        except ValueError as err:
            rejected.append(
                Rejected(f"line-{line_no}", f"{shown}:{line_no}", "", "invalid_manifest_line", str(err)).as_dict()
            )
            continue
        entries.append((line_no, entry))
    if not entries and not rejected:
        raise StageInputError(f"ingest.path {shown}: the manifest is empty")
    return entries, rejected


# -- work: runs as one Ray task per unit --------------------------------------------------------
def write_part(unit: Unit, cfg: IngestConfig, out: Storage) -> dict:
    rows, rejected, combos = [], [], Counter()
    with out.open_write("parts", f"part-{unit.part:05d}.parquet") as stream:
        with pq.ParquetWriter(stream, SCHEMA, compression="zstd") as writer:
            for item in unit_samples(unit, cfg):
                if isinstance(item, Rejected):
                    rejected.append(item.as_dict())
                    continue
                rows.append(item)
                combos[combination(item)] += 1
                if len(rows) == 256:  # bounded memory: one row group at a time
                    writer.write_table(to_table(rows))
                    rows = []
            writer.write_table(to_table(rows))
    return {"samples": sum(combos.values()), "rejected": rejected, "combinations": dict(combos)}


def unit_samples(unit: Unit, cfg: IngestConfig) -> Iterator[dict | Rejected]:
    limit = cfg.member_limit
    if unit.kind == "demo":
        # Sizes left unset (a section built alone, not through a pipeline config) keep the world's defaults.
        settings = {k: v for k, v in cfg.demo.model_dump(exclude={"num_samples"}).items() if v is not None}
        world = DemoWorld(**settings | {"shape_counts": tuple(settings["shape_counts"])})
        start, stop = unit.items
        yield from (world.sample(i) for i in range(start, stop))
    elif unit.kind == "shards":
        shard = Storage(unit.items[0])
        try:
            # compression=None: our reader inflates .tar.gz itself, naming the sample a break is in
            stream = shard.fs.open_input_stream(shard.path(), compression=None)
        except OSError as err:  # missing, a link loop, no permission: this shard only
            yield Rejected("", unit.items[0], "", "unreadable_shard", f"{type(err).__name__}: {err}")
            return
        with stream:
            yield from read_tar(stream, unit.items[0], limit)
    elif unit.kind == "folder":
        for key, files in unit.items:
            root = Storage(cfg.path)
            yield assemble(
                key, posixpath.dirname(files[0][0]), [read_member(uri, limit, name, root) for uri, name in files], limit
            )
    else:
        for line_no, entry in unit.items:
            yield manifest_sample(cfg.path, line_no, entry, limit)


def inside(root: Storage, target: Storage) -> bool:
    """Whether `target` lies under `root` once '..' and, on a local disk, symlinks are resolved."""
    if root.is_local() and target.is_local():
        return Path(os.path.realpath(target.path())).is_relative_to(os.path.realpath(root.path()))
    scheme = root.uri.partition("://")[0]
    base = posixpath.normpath(root.path()).rstrip("/") + "/"
    return target.uri.partition("://")[0] == scheme and posixpath.normpath(target.path()).startswith(base)


def read_member(uri: str, limit: int, name: str, root: Storage | None = None) -> Member:
    """A file as the member `name` of a sample; never read when it lies outside `root`."""
    try:
        file = Storage(uri)
        if root is not None and not inside(root, file):
            return Member(name, None, "path_outside_root", f"{uri} is outside the data root {root.uri}")
        size = file.fs.get_file_info(file.path()).size
        if size is None:
            return Member(name, None, "missing_file", uri)
        if size > limit:
            return Member(name, None, "oversized_member", f"{size} bytes > limit {limit}")
        return Member(name, file.read_bytes())
    except (OSError, ValueError) as err:
        return Member(name, None, "missing_file", f"{uri}: {err}")


def manifest_sample(manifest: str, line_no: int, entry: dict, limit: int) -> dict | Rejected:
    """A manifest line: {"key"?, "image"?: path, "audio"?: path, "text"?: str, other keys -> json}."""
    origin = f"{manifest}:{line_no}"
    key = str(entry.get("key") or f"{posixpath.splitext(posixpath.basename(manifest))[0]}-{line_no:08d}")
    if "." in posixpath.basename(key) or unsafe_name(key):
        return Rejected(key, origin, "key", "invalid_key", "keys may not contain '.', '..' or start with '/'")
    base = Storage(posixpath.dirname(Storage(manifest).uri))  # the data root: media lie below it
    members = []
    for field in ("image", "audio"):
        if entry.get(field):
            path = str(entry[field])
            uri = path if "://" in path else base.child(path).uri
            ext = posixpath.basename(path).rsplit(".", 1)[-1] if "." in posixpath.basename(path) else "bin"
            members.append(read_member(uri, limit, f"{key}.{ext}", base))
    if entry.get("text") is not None:
        members.append(Member(f"{key}.txt", str(entry["text"]).encode("utf-8")))
    meta = {k: v for k, v in entry.items() if k not in ("key", "image", "audio", "text")}
    if meta:
        members.append(Member(f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8")))
    return assemble(key, origin, members, limit)
