"""A local Arrow dataset: the one training format that needs no Deep Lake (pyarrow only).

Where Deep Lake cannot be installed (the GPU check's machine has no network, and deeplake's wheels weigh 57 MB
against a 64 MiB carry: benchmarks/gpu_wheels.sh), training reads the same rows from a directory holding one
uncompressed Arrow IPC file, ``data.arrow``, with text columns ``question`` and ``answer`` (``conversation`` and
``source`` optional). :func:`sft.data.source.open_dataset` opens it memory-mapped and hands back an object with the
part of Deep Lake's read API that :class:`sft.data.source.ShardedSource` uses (``len``, ``schema.columns``,
``ds["col"][slice or list of rows]``, ``id``, ``version``), so sharding, epoch order, resume cursors, the length
cache and validation are the same code for both formats.

Write one with :func:`write_arrow_dataset` (rows as ``sft.data.ingest.write_dataset`` takes them). Deep Lake stays
the format of ``sft ingest`` and of remote (s3://, ...) datasets.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

ARROW_FILE = "data.arrow"
_ID_KEY = b"sft_dataset_id"


def is_arrow_dataset(local: str) -> bool:
    """True for a local directory that holds ``data.arrow`` (a stat, no read)."""
    return os.path.isfile(os.path.join(local, ARROW_FILE))


@dataclass(frozen=True)
class ArrowType:
    """A column's type, as open_dataset's checks read it."""

    name: str

    @property
    def is_text(self) -> bool:
        return self.name in ("string", "large_string", "string_view")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class _ColumnInfo:
    name: str
    dtype: ArrowType


@dataclass(frozen=True)
class _Schema:
    columns: list


class _Column:
    def __init__(self, array) -> None:
        self._array = array

    def __getitem__(self, index) -> list:
        """A slice of rows, or a list of row indices (rows come back in that order): a Python list, like Deep Lake."""
        import pyarrow as pa

        if isinstance(index, slice):
            start, stop, step = index.indices(len(self._array))
            if step != 1:
                raise ValueError("Arrow dataset columns read contiguous slices or lists of rows")
            return self._array.slice(start, max(0, stop - start)).to_pylist()
        return self._array.take(pa.array(index, type=pa.int64())).to_pylist()


class ArrowDataset:
    """A read-only, memory-mapped ``data.arrow`` (see the module docstring)."""

    def __init__(self, local: str) -> None:
        import pyarrow as pa

        file = os.path.join(local, ARROW_FILE)
        self._table = pa.ipc.open_file(pa.memory_map(file, "r")).read_all()
        st = os.stat(file)
        meta = self._table.schema.metadata or {}
        self.id = meta.get(_ID_KEY, b"").decode()
        self.version = f"arrow-{st.st_size}-{st.st_mtime_ns}"
        self.schema = _Schema([_ColumnInfo(f.name, ArrowType(str(f.type))) for f in self._table.schema])

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, column: str) -> _Column:
        return _Column(self._table.column(column))


def write_arrow_dataset(path: str, rows: Iterable[dict[str, Any]],
                        columns: tuple[str, ...] = ("question", "answer", "source")) -> str:
    """Write ``rows`` (mappings with at least question and answer) as an Arrow dataset directory at ``path``.

    Written into a temporary sibling and renamed, so ``path`` is either the complete dataset or absent; an
    existing ``path`` is an error. Returns the path."""
    import pyarrow as pa

    out = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(out):
        raise FileExistsError(f"{path} exists; remove it or write elsewhere")
    data: dict[str, list] = {c: [] for c in columns}
    for row in rows:
        for c in columns:
            data[c].append(row.get(c))
    schema = pa.schema([pa.field(c, pa.string()) for c in columns], metadata={_ID_KEY: uuid.uuid4().hex.encode()})
    table = pa.table({c: pa.array(v, type=pa.string()) for c, v in data.items()}, schema=schema)
    tmp = f"{out}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    try:
        with pa.OSFile(os.path.join(tmp, ARROW_FILE), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
