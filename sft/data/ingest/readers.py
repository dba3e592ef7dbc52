"""Input files -> records: ``read(path, kind, fields, split, seen)`` yields ``(unit, number, record)``.

``unit`` and ``number`` locate the record for messages (``data.jsonl line 3``): 1-based, ``line N`` for JSONL and
CSV (the physical line where the record starts, header = line 1), ``record N`` for a JSON list, ``row N`` for
Parquet and Hugging Face datasets. A record that cannot be parsed at all (a broken JSON line, a CSV line with the
wrong number of fields, an unpaired surrogate) is yielded as a :class:`BadRecord` holding the message, so that
ingest can report every bad row of a run; problems of a whole file (not UTF-8, an unreadable Parquet file, a
missing column in a table's schema) raise :class:`IngestError` at once.

Formats come from the extension (``.jsonl``/``.ndjson``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``/``.pq``; a
directory is a Hugging Face dataset) or from ``fmt`` (``--format``) for every input. A ``.json`` file holds either
a list of objects or, if it starts with ``{``, one object per line (many ".json" files in the wild are JSONL).
Columnar readers check the schema once up front, so a missing column is reported before any row is read.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sft.data.ingest.formats import Fields, needed
from sft.errors import IngestError

#: Rows per Parquet / Hugging Face read batch (bounded memory; never the whole file).
READ_BATCH = 1024

FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "hf")
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_FORMAT_ALIASES = {"datasets": "hf", "huggingface": "hf", "arrow": "hf", "ndjson": "jsonl", "pq": "parquet"}
_SUPPORTED = (
    "supported: .jsonl/.ndjson, .json (list of objects or JSON lines), .csv, .tsv, .parquet/.pq, and Hugging Face "
    "datasets saved with save_to_disk (a directory); or name the format with --format "
    + "|".join(FORMATS)
)


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be parsed; ``message`` names the file, the location and what is wrong."""

    message: str


# ---------------------------------------------------------------------------------------------- format detection


def _is_hf_dir(path: str) -> bool:
    # What datasets' save_to_disk writes: dataset_dict.json for a DatasetDict, state.json (+ arrow files) for one split.
    return any(os.path.isfile(os.path.join(path, m)) for m in ("dataset_dict.json", "state.json"))


def detect(path: str, fmt: str | None) -> str:
    if not os.path.exists(path):
        raise IngestError(f"input {path} does not exist; check the path")
    if fmt is not None:
        if fmt == "hf" and not os.path.isdir(path):
            raise IngestError(f"{path}: --format hf expects a directory written by datasets' save_to_disk")
        if fmt != "hf" and os.path.isdir(path):
            raise IngestError(f"{path} is a directory; --format {fmt} expects a file")
        return fmt
    if os.path.isdir(path):
        if _is_hf_dir(path):
            return "hf"
        import deeplake

        if deeplake.exists(path):
            raise IngestError(f"{path} is already a Deep Lake dataset; train on it directly (data.path={path})")
        raise IngestError(
            f"{path} is a directory but not a Hugging Face dataset (no dataset_dict.json or state.json); {_SUPPORTED}"
        )
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise IngestError(f"cannot tell the format of {path} from its extension {ext or '(none)'!r}; {_SUPPORTED}")
    return _EXTENSIONS[ext]


def normalize_fmt(fmt: str | None) -> str | None:
    if fmt is None:
        return None
    f = _FORMAT_ALIASES.get(fmt.lower().lstrip("."), fmt.lower().lstrip("."))
    if f not in FORMATS:
        raise IngestError(f"--format {fmt}: unknown format; {_SUPPORTED}")
    return f



# ---------------------------------------------------------------------------------------------- readers
# Each reader yields (unit, number, record), e.g. ("line", 3, {...}); with the path that makes the location
# "data.jsonl line 3" in messages. formats.Converter turns records into rows.
# Columnar readers check the schema once up front, so a missing column is reported before any row is read.


def _open_text(path: str):
    # utf-8-sig: tolerate the BOM Excel and some Windows tools put in front of CSV/JSON files.
    return open(path, encoding="utf-8-sig", newline="")


def _decode_error(path: str, e: UnicodeDecodeError) -> IngestError:
    return IngestError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-save the file as UTF-8")


#: A JSON escape of a UTF-16 surrogate (paired ones encode emoji and are fine; unpaired ones are not text).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_surrogates(value: Any, where: str, name: str = "") -> None:
    """Refuse strings holding unpaired surrogates (JSON can spell them, UTF-8 cannot encode them, Deep Lake fails on
    them with an opaque error); the message names the field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise IngestError(
                f"{where}: field {name or '(record)'!r} holds an unpaired UTF-16 surrogate "
                f"({value[e.start:e.end]!r} at character {e.start}), which is not valid text; fix that escape "
                f"sequence in the file"
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_surrogates(v, where, f"{name}.{k}" if name else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_surrogates(v, where, f"{name}[{i}]")


def _surrogate_free(record: Any, where: str) -> Any:
    """``record``, or a :class:`BadRecord` when one of its strings holds an unpaired surrogate."""
    try:
        _check_surrogates(record, where)
    except IngestError as e:
        return BadRecord(str(e))
    return record


def _read_jsonl(path: str, fields: Fields, split: str | None, seen: list[str] | None = None
                ) -> Iterator[tuple[str, int, Any]]:
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue  # blank lines (often a trailing newline) are not records
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    yield "line", lineno, BadRecord(
                        f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno}); each line must be one "
                        f"JSON object"
                    )
                    continue
                if "\\u" in line and _SURROGATE_ESCAPE.search(line):
                    record = _surrogate_free(record, f"{path} line {lineno}")
                yield "line", lineno, record
    except UnicodeDecodeError as e:
        raise _decode_error(path, e) from None


def _read_json(path: str, fields: Fields, split: str | None, seen: list[str] | None = None
               ) -> Iterator[tuple[str, int, Any]]:
    try:
        with _open_text(path) as fh:
            head = fh.read(4096).lstrip()
            if not head:
                return
            if head[0] != "[":
                # Not a list: treat as JSON lines, the common reality behind ".json" exports.
                yield from _read_jsonl(path, fields, split)
                return
            fh.seek(0)
            try:
                data = json.load(fh)  # a JSON document cannot be streamed without extra deps; lists are read whole
            except json.JSONDecodeError as e:
                raise IngestError(
                    f"{path} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno}); a .json file must hold "
                    f"a list of objects, or one object per line"
                ) from None
    except UnicodeDecodeError as e:
        raise _decode_error(path, e) from None
    for i, record in enumerate(data, 1):
        yield "record", i, _surrogate_free(record, f"{path} record {i}")


def _read_csv(
    path: str, fields: Fields, split: str | None, seen: list[str] | None = None, delimiter: str = ","
) -> Iterator[tuple[str, int, Any]]:
    # Answers are often longer than csv's default 128 KiB field limit; lift it (C long max on every platform).
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with _open_text(path) as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, None)
            while header == []:  # leading blank lines
                header = next(reader, None)
            if header is None:
                return
            names = [h.strip() for h in header]
            _check_columns(path, "line 1 (header)", names, fields)
            if seen is not None:
                seen[:] = names
            while True:
                before = reader.line_num
                try:
                    values = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise IngestError(f"{path} line {reader.line_num}: malformed CSV ({e})") from None
                if not values:
                    continue  # blank line
                # A quoted field may span lines; the record starts on the line after the previous one ended.
                if len(values) != len(names):
                    yield "line", before + 1, BadRecord(
                        f"{path} line {before + 1}: {len(values)} fields but the header has {len(names)}; check "
                        f"quoting and delimiters (a comma inside a value needs double quotes)"
                    )
                    continue
                yield "line", before + 1, dict(zip(names, values))
    except UnicodeDecodeError as e:
        raise _decode_error(path, e) from None


def _read_tsv(path: str, fields: Fields, split: str | None, seen: list[str] | None = None
              ) -> Iterator[tuple[str, int, Any]]:
    return _read_csv(path, fields, split, seen, delimiter="\t")


def _check_columns(path: str, where: str, names: list[str], fields: Fields) -> list[str]:
    """Schema-level field check for columnar inputs; returns the columns to read."""
    pairs = needed(names, fields)
    for name, target in pairs:
        if name not in names:
            raise IngestError(
                f"{path} {where}: no column {name!r} for {target} (columns: {', '.join(names) or 'none'}). Map "
                f"your column names with --map {target}=COLUMN, e.g. --map question=instruction answer=output"
            )
    return list(dict.fromkeys(name for name, _ in pairs))


def _read_parquet(path: str, fields: Fields, split: str | None, seen: list[str] | None = None
                  ) -> Iterator[tuple[str, int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise IngestError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    cols = _check_columns(path, "schema", pf.schema_arrow.names, fields)
    if seen is not None:
        seen[:] = pf.schema_arrow.names
    row = 0
    # iter_batches reads row-group slices of only the needed columns: memory stays at one batch.
    for batch in pf.iter_batches(batch_size=READ_BATCH, columns=cols):
        data = {c: batch.column(c).to_pylist() for c in cols}
        for i in range(batch.num_rows):
            row += 1
            yield "row", row, {c: data[c][i] for c in cols}


def _read_hf(path: str, fields: Fields, split: str | None, seen: list[str] | None = None
             ) -> Iterator[tuple[str, int, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:
        raise IngestError(f"{path}: cannot load as a Hugging Face dataset ({type(e).__name__}: {e})") from None
    label = path
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        name = split or "train"
        if name not in ds:
            raise IngestError(
                f"{path} has splits {', '.join(splits)} and no {name!r}; choose one with --split "
                + "|".join(splits)
            )
        ds, label = ds[name], f"{path} [split {name}]"
    elif split is not None:
        raise IngestError(f"{path} is a single Hugging Face Dataset without splits; drop --split {split}")
    cols = _check_columns(label, "features", list(ds.column_names), fields)
    if seen is not None:
        seen[:] = list(ds.column_names)
    unit = "row" if label == path else f"[split {split or 'train'}] row"
    row = 0
    # Arrow-backed and memory-mapped: iter() materializes only one batch of Python objects at a time.
    for batch in ds.select_columns(cols).iter(batch_size=READ_BATCH):
        n = len(batch[cols[0]])
        for i in range(n):
            row += 1
            yield unit, row, {c: batch[c][i] for c in cols}


def read(path: str, kind: str, fields: Fields, split: str | None, seen: list[str] | None = None
         ) -> Iterator[tuple[str, int, Any]]:
    """Records of one input (see the module docstring); ``seen`` receives a table's column names."""
    return READERS[kind](path, fields, split, seen)


READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "tsv": _read_tsv,
    "parquet": _read_parquet,
    "hf": _read_hf,
}

