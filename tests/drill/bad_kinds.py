"""The bad-input kinds of the drill: one builder per kind, each writing its shard(s) of good
samples around the bad one and saying what must become of every key.

A builder returns a `Kind`: the shard files it wrote, the good keys (kept, text byte for
byte), and for each bad key the reason it must be quarantined with (`KEPT`: it must be kept,
the pipeline's documented handling of that input). Keys start with the kind's name, so a
prepare quarantine row (which names the stage's own shard as its source) finds its kind.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.drill import shards_kit as kit

KEPT = "kept"


@dataclass
class Kind:
    case: str
    done: str
    expected: str
    shards: list[Path]
    good: dict[str, bytes | None]  # key -> caption bytes (None: a sample without text)
    bad: dict[str, str]  # key -> reason it must be quarantined with (or KEPT)
    shard_rows: int = 0  # quarantine rows about a whole shard (key ""), e.g. an unreadable one
    markers: list[Path] = field(default_factory=list)  # files that exist only if something was unpickled


@dataclass
class Plan:
    """A kind's samples in shard order; `write` turns them into a tar."""

    case: str
    members: list = field(default_factory=list)
    good: dict[str, bytes] = field(default_factory=dict)

    def goods(self, count: int) -> None:
        for _ in range(count):
            key = f"{self.case}-g{len(self.good)}"
            self.members += kit.good_members(key, seed=len(self.good))
            self.good[key] = kit.caption(key)

    def add(self, key: str, *members: tuple[str, bytes]) -> str:
        self.members += [(f"{key}{suffix}", data) for suffix, data in members]
        return key


def around(case: str, bad: list[tuple[str, bytes]], before: int = 2, after: int = 2) -> tuple[Plan, str]:
    """Good samples, the bad sample `case-bad` with `bad` members (suffix, data), good samples."""
    plan = Plan(case)
    plan.goods(before)
    key = plan.add(f"{case}-bad", *bad)
    plan.goods(after)
    return plan, key


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def sample_kind(case: str, done: str, expected: str, reason: str, bad: Callable[[str], list]) -> Callable:
    """A kind whose bad sample is a few members in a well-formed tar."""

    def build(folder: Path) -> Kind:
        plan, key = around(case, bad(case))
        path = write(folder, f"{case}.tar", kit.tar_bytes(plan.members))
        return Kind(case, done, expected, [path], plan.good, {key: reason})

    return build


def img(data: bytes, ext: str = ".jpg") -> list:
    """An image member with a good caption beside it (so only the image is at fault)."""
    return [(ext, data), (".txt", b"a caption of its own")]


def aud(data: bytes, ext: str = ".wav") -> list:
    return [(".txt", b"a transcript of its own"), (ext, data)]


GOOD_JPEG = kit.jpeg(7)
SCAN = kit.jpeg_scan_start(GOOD_JPEG)

SAMPLE_KINDS = [
    sample_kind(
        "jpeg_cut_in_header",
        "a JPEG member cut 100 bytes in (inside its tables)",
        "undecodable_image: the header cannot be read, so nothing says it was cut",
        "undecodable_image",
        lambda c: img(GOOD_JPEG[:100]),
    ),
    sample_kind(
        "jpeg_cut_in_scan",
        "a JPEG member cut 20 bytes into its pixel data",
        "truncated_image (header whole, pixels stop early)",
        "truncated_image",
        lambda c: img(GOOD_JPEG[: SCAN + 20]),
    ),
    sample_kind(
        "jpeg_cut_near_end",
        "a JPEG member missing its last 10 bytes",
        "truncated_image",
        "truncated_image",
        lambda c: img(GOOD_JPEG[:-10]),
    ),
    sample_kind(
        "jpeg_magic_random",
        "3000 random bytes behind a JPEG magic number",
        "undecodable_image, not truncated_image",
        "undecodable_image",
        lambda c: img(kit.random_behind_jpeg_magic()),
    ),
    sample_kind(
        "png_bad_crc",
        "a PNG whose IHDR checksum is wrong",
        "undecodable_image",
        "undecodable_image",
        lambda c: img(kit.png_bad_crc(), ".png"),
    ),
    sample_kind(
        "image_bomb",
        "a 300-byte PNG declaring 100000x100000 pixels",
        "image_too_large, from the header, before any pixel is decoded",
        "image_too_large",
        lambda c: img(kit.png_bomb(), ".png"),
    ),
    sample_kind(
        "image_1x1",
        "a 1x1 PNG (the model sees 32x32)",
        "image_too_small: upscaled it is one flat colour; prepare.min_image_side (default 16) sets the floor",
        "image_too_small",
        lambda c: img(kit.png((1, 1)), ".png"),
    ),
    sample_kind(
        "zero_length_member",
        "a sample whose JPEG member has 0 bytes",
        "empty_member (ingest), the whole sample",
        "empty_member",
        lambda c: img(b""),
    ),
    sample_kind(
        "text_not_utf8",
        "a caption in Latin-1 ('café' as one byte 0xE9)",
        "undecodable_text: never guessed at",
        "undecodable_text",
        lambda c: [(".jpg", kit.jpeg(3)), (".txt", "café au lait".encode("latin-1"))],
    ),
    sample_kind(
        "text_10mb",
        "a 10 MB caption beside an image",
        "kept: carried byte for byte, capped at prepare.max_text_chars when decoded (a caption, "
        "not a reason to lose the image)",
        KEPT,
        lambda c: [(".jpg", kit.jpeg(4)), (".txt", ("word " * 2_097_152).encode())],
    ),
    sample_kind(
        "gzip_bomb_member",
        "a 20 kB .txt.gz member inflating to 20 MB (limit 16 MB)",
        "oversized_member (ingest): inflation stops at the limit",
        "oversized_member",
        lambda c: [(".jpg", kit.jpeg(5)), (".txt.gz", gzip.compress(b" " * (20 << 20)))],
    ),
    sample_kind(
        "wav_corrupt_header",
        "a WAV whose fmt chunk is garbage",
        "bad_audio_header",
        "bad_audio_header",
        lambda c: aud(kit.wav_corrupt_header()),
    ),
    sample_kind(
        "wav_zero_data_chunk",
        "a WAV whose data chunk declares 0 bytes (samples follow)",
        "empty_audio: the header says no samples, and it is not second-guessed",
        "empty_audio",
        lambda c: aud(kit.wav_zero_data_chunk()),
    ),
    sample_kind(
        "audio_0_samples",
        "a well-formed WAV of 0 samples",
        "empty_audio",
        "empty_audio",
        lambda c: aud(kit.wav(np.zeros(0))),
    ),
    sample_kind(
        "flac_cut_mid_frame",
        "a 0.5 s FLAC cut in the middle of a frame",
        "truncated_audio (header good, stream breaks inside what the model uses)",
        "truncated_audio",
        lambda c: aud((lambda f: f[: len(f) // 2])(kit.flac(kit.tone(0.5))), ".flac"),
    ),
    sample_kind(
        "audio_nan",
        "a float WAV full of NaN",
        "nonfinite_audio",
        "nonfinite_audio",
        lambda c: aud(kit.wav(np.full(4000, np.nan), subtype="FLOAT")),
    ),
    sample_kind(
        "audio_inf",
        "a float WAV with +Inf and -Inf samples",
        "nonfinite_audio",
        "nonfinite_audio",
        lambda c: aud(kit.wav(np.where(np.arange(4000) % 2, np.inf, -np.inf), subtype="FLOAT")),
    ),
    sample_kind(
        "audio_1_hour",
        "an hour of FLAC (90 kB, 115 MB as float32)",
        "kept: only the frames the model uses (prepare.max_audio_seconds) are read, so an hour "
        "costs what half a second costs; refusing it would lose a good clip",
        KEPT,
        lambda c: aud(kit.flac_hour(), ".flac"),
    ),
    sample_kind(
        "no_modality",
        "a sample of one JSON member (no image, text or audio)",
        "no_modality (ingest)",
        "no_modality",
        lambda c: [(".json", b'{"label": "x"}')],
    ),
    sample_kind(
        "json_not_json",
        "a JSON member that is not JSON",
        "invalid_json",
        "invalid_json",
        lambda c: [(".jpg", kit.jpeg(6)), (".txt", b"a caption"), (".json", b"{question: 'no quotes'")],
    ),
    sample_kind(
        "json_wrong_types",
        "a JSON member whose question is a list and answer an object",
        "invalid_json naming the field (not str() of a list fed to the tokenizer)",
        "invalid_json",
        lambda c: [
            (".jpg", kit.jpeg(8)),
            (".txt", b"a caption"),
            (".json", json.dumps({"question": ["what"], "answer": {"a": 1}}).encode()),
        ],
    ),
]


def unsafe_kind(case: str, done: str, info: Callable[[str], tarfile.TarInfo], reason: str, key: Callable) -> Callable:
    """A member the reader must refuse by its name or type, never write or follow."""

    def build(folder: Path) -> Kind:
        plan = Plan(case)
        plan.goods(2)
        plan.members.append((info(case), None))
        plan.goods(2)
        path = write(folder, f"{case}.tar", kit.tar_bytes(plan.members))
        return Kind(
            case, done, f"{reason} (ingest), keyed by the member's own name", [path], plan.good, {key(case): reason}
        )

    return build


UNSAFE_KINDS = [
    unsafe_kind(
        "name_dotdot",
        "a member named ../<case>-evil.txt",
        lambda c: kit.member_info(f"../{c}-evil.txt", 0),
        "unsafe_name",
        lambda c: f"../{c}-evil",
    ),
    unsafe_kind(
        "name_absolute",
        "a member named /tmp/<case>-abs.txt",
        lambda c: kit.member_info(f"/tmp/{c}-abs.txt", 0),
        "unsafe_name",
        lambda c: f"/tmp/{c}-abs",
    ),
    unsafe_kind(
        "symlink_member",
        "a symlink member <case>-link.txt -> /etc/passwd",
        lambda c: kit.member_info(f"{c}-link.txt", kind=tarfile.SYMTYPE, link="/etc/passwd"),
        "not_regular_file",
        lambda c: f"{c}-link",
    ),
    unsafe_kind(
        "hardlink_member",
        "a hard-link member <case>-hard.txt -> <case>-g0.txt",
        lambda c: kit.member_info(f"{c}-hard.txt", kind=tarfile.LNKTYPE, link=f"{c}-g0.txt"),
        "not_regular_file",
        lambda c: f"{c}-hard",
    ),
]


def pickle_kind(ext: str, payload: Callable[[Path], bytes]) -> Callable:
    case = f"pickle_{ext}"

    def build(folder: Path) -> Kind:
        marker = folder / f"{case}.UNPICKLED"
        control = folder / f"{case}.control"
        # The payload is live: a copy aimed at another file, unpickled here (we made it), creates it.
        live = payload(control)
        if ext == "pth":
            live = zipfile.ZipFile(io.BytesIO(live)).read("archive/data.pkl")
        pickle.loads(live)
        assert control.exists(), "the planted pickle does not work"
        control.unlink()
        plan, key = around(case, [(".jpg", kit.jpeg(9)), (".txt", b"a caption"), (f".{ext}", payload(marker))])
        path = write(folder, f"{case}.tar", kit.tar_bytes(plan.members))
        return Kind(
            case,
            f"a .{ext} member whose unpickling would create {marker.name}",
            "pickle_member (ingest); the marker file never appears",
            [path],
            plan.good,
            {key: "pickle_member"},
            markers=[marker],
        )

    return build


PICKLE_KINDS = [
    pickle_kind("pyd", kit.planted_pickle),
    pickle_kind("pickle", kit.planted_pickle),
    pickle_kind("pth", kit.planted_torch),
]


# -- kinds about a whole tar -------------------------------------------------------------------------
def tar_cut(case: str, done: str, cut_at: Callable[[dict, str], int], member: str = ".jpg") -> Callable:
    """Good samples, then `case-bad`, whose tar is cut at cut_at(offsets, bad member name)."""

    def build(folder: Path) -> Kind:
        plan = Plan(case)
        plan.goods(2)
        good = dict(plan.good)  # what follows the cut is gone with the bytes
        key = plan.add(f"{case}-bad", *bad_full())
        plan.goods(2)
        data = kit.tar_bytes(plan.members)
        path = write(folder, f"{case}.tar", data[: cut_at(kit.member_offsets(data), f"{key}{member}")])
        return Kind(
            case,
            done,
            "corrupt_tar naming the cut sample; the complete sample before it kept",
            [path],
            good,
            {key: "corrupt_tar"},
        )

    return build


def bad_full() -> list[tuple[str, bytes]]:
    return [(".jpg", kit.jpeg(11)), (".txt", b"the cut sample"), (".wav", kit.wav(kit.tone()))]


TAR_KINDS = [
    tar_cut(
        "tar_cut_first_member_start",
        "the tar cut 1 byte into the data of a sample's first member (its JPEG)",
        lambda o, m: o[m][1] + 1,
    ),
    tar_cut(
        "tar_cut_first_member_middle",
        "the tar cut half-way through a sample's first member (its JPEG)",
        lambda o, m: o[m][1] + 600,
    ),
    tar_cut(
        "tar_cut_later_member",
        "the tar cut inside a sample's third member (its WAV)",
        lambda o, m: o[m][1] + 3000,
        member=".wav",
    ),
    tar_cut(
        "tar_cut_mid_header",
        "the tar cut 300 bytes into the header block of a sample's first member",
        lambda o, m: o[m][0] + 300,
    ),
]


def no_end_blocks(folder: Path) -> Kind:
    case = "tar_no_end_blocks"
    plan = Plan(case)
    plan.goods(4)
    path = write(folder, f"{case}.tar", kit.tar_bytes(plan.members, end_blocks=False))
    last = f"{case}-g3"
    return Kind(
        case,
        "a complete tar without its two end-of-archive blocks",
        "every sample kept (the last has every member its neighbours have)",
        [path],
        {k: v for k, v in plan.good.items() if k != last},
        {last: KEPT},
    )


def gzip_corrupt(folder: Path) -> Kind:
    case = "gzip_corrupt_stream"
    plan = Plan(case)
    plan.goods(3)
    head = list(plan.members)
    key = plan.add(f"{case}-bad", *bad_full())
    tail = plan.members[len(head) :]
    path = write(folder, f"{case}.tar.gz", kit.gzip_corrupt_tail(head, tail))
    return Kind(
        case,
        "a .tar.gz whose stream is corrupt inside its last sample",
        "corrupt_tar naming that sample; the samples before it kept (a gzip stream cannot resync, "
        "so nothing after a corrupt stretch is readable)",
        [path],
        plan.good,
        {key: "corrupt_tar"},
    )


def duplicate_in_shard(folder: Path) -> Kind:
    case = "duplicate_key_in_shard"
    plan = Plan(case)
    plan.goods(1)
    key = plan.add(f"{case}-dup", (".jpg", kit.jpeg(12)), (".txt", b"the first copy"))
    plan.goods(1)
    plan.add(key, (".jpg", kit.jpeg(13)), (".txt", b"the later copy"))
    plan.goods(1)
    path = write(folder, f"{case}.tar", kit.tar_bytes(plan.members))
    return Kind(
        case,
        "one key twice in a shard, another sample between the copies",
        "the first copy kept (its text byte for byte), the later one duplicate_key (shard)",
        [path],
        plan.good | {key: b"the first copy"},
        {key: "duplicate_key"},
    )


def split_over_shards(folder: Path) -> Kind:
    case = "sample_split_over_shards"
    first, second = Plan(case), Plan(case)
    first.goods(2)
    key = first.add(f"{case}-split", (".jpg", kit.jpeg(14)))
    second.good = dict(first.good)  # key numbering goes on
    second.add(key, (".txt", b"the split-off caption"))
    second.goods(2)
    paths = [
        write(folder, f"{case}-a.tar", kit.tar_bytes(first.members)),
        write(folder, f"{case}-b.tar", kit.tar_bytes(second.members)),
    ]
    return Kind(
        case,
        "a sample's JPEG ends shard a, its caption starts shard b",
        "shards are read apart (WebDataset rule): a's image-only part kept, b's caption "
        "duplicate_key (shard), never merged",
        paths,
        second.good | {key: None},
        {key: "duplicate_key"},
    )


def unreadable_shards(folder: Path) -> Kind:
    case = "shard_unreadable"
    missing, loop = folder / f"{case}-missing.tar", folder / f"{case}-loop.tar"
    os.symlink(folder / "no-such-folder" / "shard.tar", missing)
    os.symlink(loop.name, loop)  # a link to itself: ELOOP even for root
    return Kind(
        case,
        "two shard names that cannot be read: a link to a missing file, a link loop",
        "one unreadable_shard line each naming the path (ingest); every other shard read",
        [missing, loop],
        {},
        {},
        shard_rows=2,
    )


BUILDERS: list[Callable[[Path], Kind]] = [
    *SAMPLE_KINDS,
    *UNSAFE_KINDS,
    *PICKLE_KINDS,
    *TAR_KINDS,
    no_end_blocks,
    gzip_corrupt,
    duplicate_in_shard,
    split_over_shards,
    unreadable_shards,
]
