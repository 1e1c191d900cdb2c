"""The one storage root every stage reads and writes under.

A local folder by default; any URI pyarrow knows (file://, s3://, gs://, hdfs://, ...) on a
cluster. Stages only ever see a `Storage`, never a driver-local path, so the same code runs on
workers of other nodes when the root is shared storage.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow.fs as pafs


def to_uri(location: str) -> str:
    """A local path (relative to the current directory) becomes an absolute file:// URI."""
    if "://" in location:
        return location.rstrip("/")
    return Path(location).expanduser().resolve().as_uri()


class Storage:
    """A folder on some filesystem; relative paths below it use '/'."""

    def __init__(self, location: str):
        self.uri = to_uri(location)
        self.fs, self.base = pafs.FileSystem.from_uri(self.uri)

    def __reduce__(self):
        # Rebuild from the URI on the worker: credentials come from the worker's environment.
        return (Storage, (self.uri,))

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def path(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts) if parts else self.base

    def child(self, *parts: str) -> Storage:
        """A file or folder below this one; parts are plain names (spaces, '%', '#' are fine)."""
        return Storage(posixpath.join(self.uri, *(quote(part, safe="/") for part in parts)))

    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def local_path(self, *parts: str) -> Path:
        """Only for local roots: the same place as a pathlib.Path."""
        if not self.is_local():
            raise ValueError(f"{self.uri} is not on the local filesystem")
        return Path(self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def remove_tree(self, *parts: str) -> None:
        if self.exists(*parts):
            self.fs.delete_dir(self.path(*parts))

    def open_write(self, *parts: str):
        target = self.path(*parts)
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        return self.fs.open_output_stream(target)

    def open_read(self, *parts: str):
        return self.fs.open_input_stream(self.path(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        with self.open_write(*parts) as out:
            out.write(data)

    def read_bytes(self, *parts: str) -> bytes:
        with self.open_read(*parts) as stream:
            return stream.read()

    def write_json(self, value: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(value, indent=2, ensure_ascii=False).encode(), *parts)

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def size(self, *parts: str) -> int:
        return self.fs.get_file_info(self.path(*parts)).size

    def list_files(self, *parts: str, suffix: str = "") -> list[str]:
        """Files below a folder, as paths relative to this root, sorted."""
        return sorted(self._walk(self.path(*parts), suffix))

    def _walk(self, folder: str, suffix: str) -> Iterator[str]:
        if self.fs.get_file_info(folder).type != pafs.FileType.Directory:
            return
        selector = pafs.FileSelector(folder, recursive=True)
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File and info.path.endswith(suffix):
                yield posixpath.relpath(info.path, self.base)

    def upload(self, folder: str | Path) -> str:
        """Copy a local folder's files (recursively) into this folder; returns this folder's URI."""
        folder = Path(folder)
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.write_bytes(path.read_bytes(), *path.relative_to(folder).parts)
        return self.uri

    def local_copy(self) -> Path:
        """This folder as a local path: itself on a local root, else a fresh local copy."""
        if self.is_local():
            return self.local_path()
        import tempfile

        target = Path(tempfile.mkdtemp(prefix="crossmodal-"))
        for relative in self.list_files():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            (target / relative).write_bytes(self.read_bytes(relative))
        return target
