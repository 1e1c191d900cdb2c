"""The project's shard reader on real shards from other tools and on crafted bad members."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile

import numpy as np
import pytest

from pipelines.data.wds_reader import Rejected, read_tar, split_name

LIMIT = 64 * 1024 * 1024


def read(path, limit=LIMIT):
    with open(path, "rb") as stream:
        items = list(read_tar(stream, str(path), limit))
    return [i for i in items if isinstance(i, dict)], [i for i in items if isinstance(i, Rejected)]


def members_of(path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}


@pytest.mark.parametrize(
    "name, key, field",
    [
        ("clip1.xyzdata.abc1.flac", "clip1", "xyzdata.abc1.flac"),
        (
            "test/resources/dataset/librispeech-1995-1837-0001.wav",
            "test/resources/dataset/librispeech-1995-1837-0001",
            "wav",
        ),
        ("a/b.c/d.e.f", "a/b.c/d", "e.f"),
        ("noext", "noext", ""),
    ],
)
def test_key_rule(name, key, field):
    assert split_name(name) == (key, field)


def test_wenet_audio_text_keys_with_slashes_and_chinese(fixtures_dir):
    path = fixtures_dir / "shards" / "wenet-audio-text.tar"
    samples, rejected = read(path)
    raw = members_of(path)
    assert rejected == []
    assert [s["key"] for s in samples] == [
        "test/resources/dataset/aishell-BAC009S0724W0121",
        "test/resources/dataset/librispeech-1995-1837-0001",
    ]
    chinese = samples[0]
    assert "广州市房地产中介协会分析" in chinese["text"].decode("utf-8")
    assert chinese["audio"] == raw["test/resources/dataset/aishell-BAC009S0724W0121.wav"]
    assert (chinese["audio_ext"], chinese["image"]) == ("wav", None)


def test_caiman_dotted_names_group_by_first_dot(fixtures_dir):
    path = fixtures_dir / "shards" / "caiman-dotted-keys.tar"
    samples, rejected = read(path)
    raw = members_of(path)
    assert rejected == []
    assert [s["key"] for s in samples] == ["clip1", "clip2"]
    assert samples[0]["audio_ext"] == "flac"
    assert samples[0]["audio"] == raw["clip1.xyzdata.abc1.flac"]
    assert samples[1]["text"] == raw["clip2.xyzdata.abc1.txt"]


def test_gzip_compressed_shard_of_images_and_labels(fixtures_dir):
    samples, rejected = read(fixtures_dir / "shards" / "webdataset-digits.tgz")
    assert (len(samples), rejected) == (90, [])
    assert all(s["image_ext"] == "png" and s["image"][:8] == b"\x89PNG\r\n\x1a\n" for s in samples)
    assert {s["cls"] for s in samples} == {str(d).encode() for d in range(10)}


def test_directory_members_and_per_member_gzip(fixtures_dir):
    path = fixtures_dir / "shards" / "webdataset-compressed.tar"
    samples, rejected = read(path)
    raw = members_of(path)
    assert rejected == []
    assert [s["key"] for s in samples] == ["compressed/0001", "compressed/0002", "compressed/0003"]
    assert samples[0]["text"] == gzip.decompress(raw["compressed/0001.txt.gz"])


def test_zero_length_members_are_rejected_not_fatal(fixtures_dir):
    samples, rejected = read(fixtures_dir / "shards" / "lhotse-zero-length.tar")
    assert samples == []
    assert [r.reason for r in rejected] == ["empty_member", "empty_member"]
    assert rejected[0].member.endswith(".nodata")


def test_pickled_shard_is_refused_without_unpickling(fixtures_dir, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("something tried to unpickle an untrusted shard")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    samples, rejected = read(fixtures_dir / "shards" / "speechbrain-pickled-pth.tar")
    assert samples == []
    assert [r.reason for r in rejected] == ["pickle_member"] * 3
    assert rejected[0].member == "tests/samples/single-mic/example6_wav.audio.pth"


# -- crafted shards: each bad sample is rejected with its reason, good neighbours survive --------
def add(archive: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def crafted(tmp_path, build) -> tuple[list[dict], list[Rejected]]:
    path = tmp_path / "crafted.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        add(archive, "good1.txt", b"first good sample")
        build(archive)
        add(archive, "good2.txt", b"second good sample")
    return read(path, limit=1000)


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda a: add(a, "../escape.txt", b"x"), "unsafe_name"),
        (lambda a: add(a, "/etc/absolute.txt", b"x"), "unsafe_name"),
        (lambda a: add(a, "linked.txt", kind=tarfile.SYMTYPE, link="/etc/passwd"), "not_regular_file"),
        (lambda a: add(a, "huge.txt", b"x" * 1001), "oversized_member"),
        (lambda a: add(a, "empty.txt", b""), "empty_member"),
        (lambda a: add(a, "broken.txt.gz", b"\x1f\x8b\x08\x00garbage"), "corrupt_gzip"),
        (lambda a: add(a, "bomb.txt.gz", gzip.compress(b"0" * 5000)), "oversized_member"),
        (lambda a: add(a, "model.pth", b"anything"), "pickle_member"),
        (lambda a: add(a, "sneaky.txt", pickle.dumps({"a": 1})), "pickle_member"),
        (lambda a: add(a, "weird.xyz", b"x"), "unknown_extension"),
        (lambda a: (add(a, "two.jpg", b"a"), add(a, "two.png", b"b")), "duplicate_member"),
        (lambda a: add(a, "meta.json", b"{}"), "no_modality"),
    ],
)
def test_bad_member_rejects_its_sample_only(tmp_path, build, reason):
    samples, rejected = crafted(tmp_path, build)
    assert [s["key"] for s in samples] == ["good1", "good2"]
    assert [r.reason for r in rejected] == [reason]


def test_truncated_tar_keeps_what_came_before(tmp_path):
    path = tmp_path / "whole.tar"
    with tarfile.open(path, "w") as archive:
        for i in range(6):
            add(archive, f"s{i}.txt", b"y" * 600)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[:3000])
    samples, rejected = read(cut)
    # s1's member arrived whole and it has every member s0 has: kept. The cut (in its padding,
    # before the next header) is one row for the shard: no sample name arrived to give it.
    assert [s["key"] for s in samples] == ["s0", "s1"]
    assert [(r.key, r.reason) for r in rejected] == [("", "corrupt_tar")]
    cut.write_bytes(path.read_bytes()[:2500])  # inside s1's data: s1 is named
    samples, rejected = read(cut)
    assert [s["key"] for s in samples] == ["s0"] and [(r.key, r.reason) for r in rejected] == [("s1", "corrupt_tar")]


@pytest.mark.parametrize("where", ["first", "later"])
def test_a_cut_inside_a_member_names_its_sample_and_keeps_the_complete_one_before(where):
    """img2dataset order: the image first, most of the bytes; a cut lands there most often."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for key in ("a", "b"):
            add(archive, f"{key}.jpg", b"j" * 5000)
            add(archive, f"{key}.txt", b"caption")
    data = buffer.getvalue()
    # b.jpg's data starts after a's two members (512 + 5120, 512 + 512) and its own header.
    b_jpg = 512 + 5120 + 512 + 512 + 512
    cut = b_jpg + 2000 if where == "first" else b_jpg + 5120 + 512 + 3  # inside b.txt
    items = list(read_tar(io.BytesIO(data[:cut]), "mem", LIMIT))
    assert [i["key"] for i in items if isinstance(i, dict)] == ["a"]
    [rejected] = [i for i in items if isinstance(i, Rejected)]
    assert (rejected.key, rejected.member, rejected.reason) == (
        "b",
        "b.jpg" if where == "first" else "b.txt",
        "corrupt_tar",
    )


def tar_of(count: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for i in range(count):
            add(archive, f"s{i:03d}.txt", f"caption {i}".encode())
            add(archive, f"s{i:03d}.json", b"{}")
    return buffer.getvalue()


def items_of(data: bytes):
    items = list(read_tar(io.BytesIO(data), "mem", LIMIT))
    return [i["key"] for i in items if isinstance(i, dict)], [
        (r.key, r.reason) for r in items if isinstance(r, Rejected)
    ]


def test_a_corrupt_header_in_the_middle_is_counted_not_swallowed():
    data = bytearray(tar_of(10))
    data[3 * 1024 + 148] ^= 0xFF  # checksum of the 4th member's header (s001.json)
    keys, rejected = items_of(bytes(data))
    assert keys == ["s000"] and rejected == [("s001", "corrupt_tar")]


def test_a_cut_on_a_block_boundary_inside_a_sample_is_counted():
    keys, rejected = items_of(tar_of(10)[: 5 * 1024])  # s002.txt arrived, its .json did not
    assert keys == ["s000", "s001"] and rejected == [("s002", "corrupt_tar")]


def test_a_tar_without_end_blocks_keeps_every_sample():
    """Some writers never add the end-of-archive blocks: the last sample has every member its
    neighbours have, so nothing of it can be missing."""
    whole = tar_of(3)
    assert items_of(whole[: 6 * 1024]) == (["s000", "s001", "s002"], [])


def test_a_cut_inside_a_header_names_the_sample_it_starts():
    """The header's name field arrived: the sample before it is complete, the cut one is named."""
    data = tar_of(3)
    keys, rejected = items_of(data[: 4 * 1024 + 300])  # 300 bytes into s002.txt's header
    assert keys == ["s000", "s001"] and rejected == [("s002", "corrupt_tar")]
    keys, rejected = items_of(data[: 4 * 1024 + 5])  # the name field cut: s001 cannot be shown whole
    assert keys == ["s000"] and rejected == [("s001", "corrupt_tar")]


def test_compressed_tars_of_every_kind():
    import bz2
    import lzma

    plain = tar_of(3)
    for packed in (gzip.compress(plain), bz2.compress(plain), lzma.compress(plain)):
        assert items_of(packed) == (["s000", "s001", "s002"], [])


def test_webdatasets_pyd_members_are_pickles_never_loaded(tmp_path):
    """`.pyd` is WebDataset's extension for pickled Python data: its decoder unpickles it."""
    samples, rejected = crafted(tmp_path, lambda a: add(a, "obj.pyd", b"not even a pickle"))
    assert [s["key"] for s in samples] == ["good1", "good2"]
    assert [(r.key, r.reason) for r in rejected] == [("obj", "pickle_member")]


def test_a_corrupt_gzip_stream_names_the_sample_it_breaks_in():
    """Inflated a block at a time, so the break is blamed on its own sample, not the one
    before it (gzip.GzipFile inflates 8 kB ahead and raises while the previous one is read)."""
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).bytes(20_000)  # stored, not compressed: the flip lands in it
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for i in range(4):
            add(archive, f"s{i}.txt", b"caption")
            add(archive, f"s{i}.wav", noise)
    plain = buffer.getvalue()
    split = 3 * (2 * 512 + 512 + 20_480)  # s3.txt's header: s3 and the end in a second gzip member
    tail = bytearray(gzip.compress(plain[split:], mtime=0))
    tail[len(tail) // 2] ^= 0xFF
    packed = gzip.compress(plain[:split], mtime=0) + bytes(tail)
    assert items_of(packed) == (["s0", "s1", "s2"], [("s3", "corrupt_tar")])


def test_a_gzip_stream_broken_before_a_name_keeps_the_whole_sample_before_it():
    plain = tar_of(4)
    split = 6 * 1024  # s003.txt's header, the first bytes of a second gzip member
    tail = bytearray(gzip.compress(plain[split:], mtime=0))
    tail[12] ^= 0xFF  # in its first deflate block: nothing of s003 inflates
    packed = gzip.compress(plain[:split], mtime=0) + bytes(tail)
    assert items_of(packed) == (["s000", "s001", "s002"], [("", "corrupt_tar")])
