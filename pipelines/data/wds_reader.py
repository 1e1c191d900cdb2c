"""Safe reading of WebDataset-style samples from tar shards and plain folders.

Grouping follows the WebDataset key rule: a member `dir/clip1.xyz.abc.flac` belongs to the
sample `dir/clip1` as field `xyz.abc.flac`, and consecutive members with the same key form
one sample. Members are only ever read as bytes: nothing is decoded here and nothing is
unpickled, ever. A sample with any bad member is rejected whole, with the member and a reason.
"""

from __future__ import annotations

import gzip
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import IO

from pipelines.data.records import SCHEMA, combination, empty_record, field_of, is_pickle


@dataclass(frozen=True)
class Rejected:
    key: str
    source: str
    member: str
    reason: str
    detail: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Member:
    name: str  # full member name as stored
    data: bytes | None  # None when the member was not read (unsafe, oversized, not a file)
    problem: str | None = None  # reason it was refused before reading
    detail: str = ""


def split_name(name: str) -> tuple[str, str]:
    """WebDataset key rule: key = folder + basename up to its first dot; field = the rest."""
    folder, base = posixpath.split(name)
    stem, _, field = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, field


def unsafe_name(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/") or "\\" in name


def gunzip(data: bytes, limit: int) -> bytes:
    """Decompress a per-member gzip with a hard output cap (decompression bombs)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    out = inflater.decompress(data, limit + 1)
    if len(out) > limit:
        raise OverflowError(f"inflates beyond {limit} bytes")
    if not inflater.eof:
        raise gzip.BadGzipFile("truncated gzip stream")
    return out


def assemble(key: str, source: str, members: list[Member], limit: int) -> dict | Rejected:
    """Turn one sample's members into a record, or reject the sample with the first problem."""
    record = empty_record(key, source)
    for member in members:
        _, field = split_name(member.name)
        if member.problem:
            return Rejected(key, source, member.name, member.problem, member.detail)
        data = member.data
        if len(data) == 0:
            return Rejected(key, source, member.name, "empty_member")
        if field.lower().endswith(".gz"):
            try:
                data = gunzip(data, limit)
            except OverflowError as err:
                return Rejected(key, source, member.name, "oversized_member", str(err))
            except (OSError, zlib.error, EOFError) as err:
                return Rejected(key, source, member.name, "corrupt_gzip", str(err))
            field = field[:-3]
        if is_pickle(field, data):
            return Rejected(key, source, member.name, "pickle_member", "serialised Python objects are never loaded")
        column = field_of(field)
        if column is None:
            return Rejected(key, source, member.name, "unknown_extension", field)
        if record[column] is not None:
            return Rejected(key, source, member.name, "duplicate_member", f"second {column} member")
        record[column] = data
        if column in ("image", "audio"):
            record[f"{column}_ext"] = field.lower().rsplit(".", 1)[-1]
    if combination(record) == "none":
        return Rejected(
            key, source, members[0].name if members else "", "no_modality", "no image, text or audio member"
        )
    return record


class TailTracker:
    """A read-through wrapper that remembers the last bytes it delivered (for the end check)."""

    KEEP = 1 << 16

    def __init__(self, raw):
        self.raw, self.total, self.tail = raw, 0, b""

    def read(self, size=-1) -> bytes:
        data = self.raw.read(size)
        self.total += len(data)
        self.tail = (self.tail + data)[-self.KEEP :]
        return data

    def after(self, offset: int) -> bytes:
        """The bytes delivered from `offset` to the end of the stream (what is still kept)."""
        return self.tail[-(self.total - offset) :] if self.total > offset else b""

    def block_at(self, offset: int) -> bytes | None:
        """The 512 bytes at `offset` of the stream, if they were delivered and are still kept."""
        start = offset - (self.total - len(self.tail))
        return self.tail[start : start + 512] if 0 <= start and offset + 512 <= self.total else None


class ChainedStream:
    """`head` bytes already read, then the rest of `raw`."""

    def __init__(self, head: bytes, raw):
        self.head, self.raw = head, raw

    def read(self, size=-1) -> bytes:
        if not self.head:
            return self.raw.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.raw.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + (self.raw.read(size - len(data)) if len(data) < size else b"")


class Gunzip:
    """The bytes of one or more gzip members in a row (as `gzip` reads them), inflated a tar
    block at a time. A corrupt stream gives back what inflated before the break and raises on
    the next read: the reader then still sees the header of the member the break is in, and
    names its sample (gzip.GzipFile inflates 8 kB ahead and loses them with the error)."""

    STEP = 512  # bytes out per inflate call
    FEED = 1024  # bytes in per call: a short unconsumed tail to copy back

    def __init__(self, raw):
        self.raw, self.inflater, self.buffer, self.pos = raw, None, b"", 0
        self.error: BaseException | None = None
        self.ended = False

    def read(self, size=-1) -> bytes:
        if self.error is not None:
            raise self.error
        want, out = size if size is not None and size >= 0 else 1 << 62, bytearray()
        try:
            while len(out) < want and not self.ended:
                out += self.step(min(self.STEP, want - len(out)))
        except (zlib.error, EOFError, OSError) as err:
            if not out:
                raise
            self.error = err
        return bytes(out)

    def step(self, size: int) -> bytes:
        if self.pos == len(self.buffer):
            self.buffer, self.pos = self.raw.read(1 << 16), 0
            if not self.buffer:
                if self.inflater is not None:
                    raise EOFError("the compressed stream ends before its end-of-stream marker")
                self.ended = True
                return b""
        if self.inflater is None:
            while self.pos < len(self.buffer) and self.buffer[self.pos] == 0:
                self.pos += 1  # zero padding between or after members, as gzip allows
            if self.pos == len(self.buffer):
                return b""
            self.inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        feed = self.buffer[self.pos : self.pos + self.FEED]
        data = self.inflater.decompress(feed, size)
        if self.inflater.eof:
            self.pos += len(feed) - len(self.inflater.unused_data)
            self.inflater = None
        else:
            self.pos += len(feed) - len(self.inflater.unconsumed_tail)
        return data


def decompressed(stream):
    """The tar bytes of a plain, gzip, bz2 or xz stream (sniffed from its first bytes)."""
    import bz2
    import lzma

    head = stream.read(6)
    chained = ChainedStream(head, stream)
    if head[:2] == b"\x1f\x8b":
        return Gunzip(chained)
    if head[:3] == b"BZh":
        return bz2.BZ2File(chained)
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(chained)
    return chained


class MissingEnd(tarfile.ReadError):
    """The stream stopped on a member boundary, without an end-of-archive block."""


class UnnamedBreak(tarfile.ReadError):
    """The stream broke before a member's name could be read: the sample it belongs to is unknown."""


class BrokenMember(Exception):
    """The tar broke inside a member's data: `name` says whose sample it was."""

    def __init__(self, name: str, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.name = name


def tar_members(stream: IO[bytes], limit: int) -> Iterator[Member]:
    """Members of a (possibly compressed) tar, read sequentially without extracting.

    Python's tarfile ends quietly at an invalid header in the middle of a stream, and at a cut
    on a block boundary; both would lose samples without a trace. A real end of archive is a
    zero block: anything else raises tarfile.ReadError after the last member.
    """
    raw = decompressed(stream)
    tracked = TailTracker(raw)
    with tarfile.open(fileobj=tracked, mode="r|") as archive:
        for info in headers(archive, tracked):
            name = info.name[2:] if info.name.startswith("./") else info.name
            if info.isdir():
                continue
            if unsafe_name(name):
                yield Member(name, None, "unsafe_name", "absolute path or '..' in the member name")
            elif not info.isfile():
                yield Member(name, None, "not_regular_file", "links and devices are refused")
            elif info.size > limit:
                yield Member(name, None, "oversized_member", f"{info.size} bytes > limit {limit}")
            else:
                try:
                    data = archive.extractfile(info).read()
                except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
                    raise BrokenMember(name, err) from err
                yield Member(name, data)
        end = tracked.block_at(archive.offset)
    if not isinstance(raw, ChainedStream):
        while tracked.read(1 << 16):  # to the end: a compressed stream's checksum comes last
            pass
    if end is None:
        cut = tracked.after(archive.offset)
        name = cut_header_name(cut)
        if name:
            raise BrokenMember(name, tarfile.ReadError(f"the archive stops inside the header of {name}"))
        if any(cut):
            raise tarfile.ReadError("the archive stops inside a member header")
        raise MissingEnd("the archive stops without an end-of-archive block")
    if any(end):
        raise tarfile.ReadError(f"invalid tar header at byte {archive.offset}")


def headers(archive: tarfile.TarFile, tracked: TailTracker) -> Iterator[tarfile.TarInfo]:
    """The archive's members; a stream that breaks while a header is read names that member,
    when its name arrived before the break."""
    members = iter(archive)
    while True:
        try:
            info = next(members)
        except StopIteration:
            return
        except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
            name = cut_header_name(tracked.after(archive.offset))
            if name:
                raise BrokenMember(name, err) from err
            raise UnnamedBreak(f"{type(err).__name__}: {err}") from err
        yield info


def cut_header_name(cut: bytes) -> str:
    """The member name in a header block the stream stopped inside, when its name field arrived
    (NUL-terminated, or all 100 bytes) and, as far as it arrived, the block is a plain file's."""
    field = cut[:100]
    if b"\0" not in field and len(field) < 100:
        return ""
    if len(cut) > 156 and cut[156:157] not in (b"0", b"\0"):
        return ""  # a link, or a PAX / GNU long-name header: not a member of a sample
    name = field.split(b"\0", 1)[0].decode("utf-8", errors="replace")
    name = name[2:] if name.startswith("./") else name
    return "" if not name or "@" in name or unsafe_name(name) else name


def fields_of(members: list[Member]) -> frozenset[str]:
    return frozenset(split_name(m.name)[1].lower() for m in members)


def read_tar(stream: IO[bytes], source: str, limit: int) -> Iterator[dict | Rejected]:
    """Samples of one shard: consecutive members with one key make a sample (WebDataset rule).

    A corrupt or truncated tar ends the shard with one rejection, keyed by the sample that was
    being read when it broke, so nothing disappears without a count. A cut inside the first
    member of a sample (where most cuts of img2dataset shards land: the image comes first and is
    most of the bytes) names that sample; the one before it was complete and is kept.

    A tar that stops on a member boundary without its end-of-archive blocks (some writers never
    add them; GNU tar and Python's tarfile read such tars quietly) keeps its last sample when it
    has the same members as the sample before it: then nothing of it can be missing. Otherwise
    the last sample may have lost members and is rejected as `corrupt_tar`.
    """
    key, bucket, before = "", [], None
    try:
        for member in tar_members(stream, limit):
            member_key, _ = split_name(member.name)
            if bucket and member_key != key:
                yield assemble(key, source, bucket, limit)
                before, bucket = fields_of(bucket), []
            key = member_key
            bucket.append(member)
    except MissingEnd as err:
        if bucket and fields_of(bucket) == before:
            yield assemble(key, source, bucket, limit)
        elif bucket:
            yield Rejected(key, source, bucket[-1].name, "corrupt_tar", f"{err}: the last sample may be incomplete")
        return
    except UnnamedBreak as err:
        # Broken at a header whose name never arrived: the sample read last is whole when it has
        # its neighbours' members; what broke is counted once, by the shard, with no key to give.
        whole = bool(bucket) and fields_of(bucket) == before
        if whole:
            yield assemble(key, source, bucket, limit)
        after = f" after sample {key}" if whole else ""
        yield Rejected(
            "" if whole else key,
            source,
            "" if whole else bucket[-1].name if bucket else "",
            "corrupt_tar",
            f"{err}: the stream breaks{after} before a member name could be read; the rest of the shard is lost",
        )
        return
    except BrokenMember as broken:
        broken_key, _ = split_name(broken.name)
        if bucket and broken_key != key:
            yield assemble(key, source, bucket, limit)
        yield Rejected(broken_key, source, broken.name, "corrupt_tar", str(broken))
        return
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        yield Rejected(
            key if bucket else "",
            source,
            bucket[-1].name if bucket else "",
            "corrupt_tar",
            f"{type(err).__name__}: {err}",
        )
        return
    if bucket:
        yield assemble(key, source, bucket, limit)


def as_row(item: dict | Rejected, path: str, split: str) -> dict:
    """A reader item as a row of the records schema: a rejected one keeps its reason."""
    if isinstance(item, Rejected):
        row = {name: None for name in SCHEMA.names}
        row.update(key=item.key, source=path, reason=item.reason, member=item.member, detail=item.detail)
    else:
        row = dict(item, source=path, reason=None, member=None, detail=None)
    row["split"] = split
    return row
