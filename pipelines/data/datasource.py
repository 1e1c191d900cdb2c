"""A Ray Data datasource over WebDataset shards that uses the project's safe reader.

Ray's own `read_webdataset` groups members the same way, but it would decode (and, asked to,
unpickle) members itself and it drops what it cannot group. This one yields every sample the
tar holds, good or not: rejected samples come through as rows with a `reason`, so the
pipeline can quarantine and count them. Files are spread over Ray Data read tasks and can
be shuffled at the file level with a seed (FileShuffleConfig).
"""

from __future__ import annotations

import posixpath
from typing import Iterator

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from pipelines.data.records import SCHEMA
from pipelines.data.wds_reader import Rejected, read_tar

ROW_SCHEMA = SCHEMA.append(pa.field("split", pa.string())) \
    .append(pa.field("reason", pa.string())) \
    .append(pa.field("member", pa.string())) \
    .append(pa.field("detail", pa.string()))
ROWS_PER_BLOCK = 64


def split_of_path(path: str) -> str:
    """Shards live in <root>/<split>/shard-*.tar; other layouts have no split ('')."""
    return posixpath.basename(posixpath.dirname(path))


class SafeShardDatasource(FileBasedDatasource):
    _FILE_EXTENSIONS = ["tar", "tgz", "gz"]

    def __init__(self, paths, member_limit: int = 64 * 1024 * 1024, **file_args):
        super().__init__(paths, **file_args)
        self.member_limit = member_limit

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        rows, split = [], split_of_path(path)
        for item in read_tar(f, path, self.member_limit):
            rows.append(as_row(item, path, split))
            if len(rows) == ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def as_row(item: dict | Rejected, path: str, split: str) -> dict:
    if isinstance(item, Rejected):
        row = {name: None for name in SCHEMA.names}
        row.update(key=item.key, source=path, reason=item.reason, member=item.member, detail=item.detail)
    else:
        row = dict(item, source=path, reason=None, member=None, detail=None)
    row["split"] = split
    return row
