"""Users' files -> a Deep Lake dataset with text columns ``question``, ``answer``, ``source`` (and, for
conversations, ``conversation``).

``write_dataset(out, rows)``
    The one writer (used by ``ingest`` and by the demo-data generator; :mod:`sft.data.ingest.writer`). Atomic: it
    writes into a sibling temporary directory ``OUT.tmp-<pid>-<random>``, commits, then renames it to ``OUT``. On
    any failure, Ctrl-C included, the temporary directory is removed, so ``OUT`` is either the complete new dataset
    or untouched.
``ingest(inputs, out, ...)``
    Reads JSONL / JSON / CSV / TSV / Parquet files and Hugging Face ``save_to_disk`` directories
    (:mod:`sft.data.ingest.readers`), turns records of the known formats -- question/answer with ``--map`` and
    joins, Alpaca, chat ``messages``, ShareGPT ``conversations`` -- into rows (:mod:`sft.data.ingest.formats`),
    validates every row *while* writing (one pass, nothing buffered beyond a write batch), applies the bad-row
    policy (:mod:`sft.data.ingest.badrows`: every bad row is reported in one run) and returns an
    :class:`IngestReport`.

Input rules (the CLI's help and the README repeat these):

* Mapping ``{"question": "instruction", "answer": "output"}`` reads target column <- source field. Defaults:
  ``question``, ``answer``; ``source`` is the input's file name unless mapped; ``messages`` names the chat field.
* Extra fields (columns nothing is mapped from) are ignored, and named per input in the summary
  (:attr:`IngestReport.ignored_fields`): judged on the header / schema of tables, on the first record of JSON inputs.
* Writes are verified: Deep Lake 4.7 does not report failed writes (a full disk, ``ulimit -f``), so the committed
  dataset is read back and compared (per-column digests) before it is renamed into place.
* Text policy: see :mod:`sft.data.ingest.formats`. Deep Lake also stores an empty string as None, so empty values
  could not round-trip anyway.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sft.data.ingest.badrows import Problems, check_policy
from sft.data.ingest.formats import RECORD_FORMATS, Converter, Fields, MapError, extra_fields, parse_fields
from sft.data.ingest.readers import FORMATS, BadRecord, normalize_fmt, read
from sft.data.ingest.readers import detect as detect_file
from sft.data.ingest.writer import COLUMNS, CONVERSATION, check_out, write_dataset
from sft.data.source import is_remote
from sft.errors import IngestError

__all__ = ["COLUMNS", "CONVERSATION", "FORMATS", "RECORD_FORMATS", "IngestReport", "ingest", "write_dataset"]


@dataclass
class IngestReport:
    """What :func:`ingest` wrote."""

    out: str
    total_rows: int
    #: rows taken from each input, keyed by the input path as given, in input order
    rows_per_file: dict[str, int] = field(default_factory=dict)
    #: rows whose whole conversation was stored (more than one exchange, or a system message)
    conversations: int = 0
    #: fields (columns) of each input that were not read, keyed like ``rows_per_file``: extra fields are ignored,
    #: and named in the summary so that a forgotten one (e.g. Alpaca's ``input``) is noticed
    ignored_fields: dict[str, list[str]] = field(default_factory=dict)
    #: bad rows left out under ``on_bad_row="skip"``, and their numbers per input
    skipped_rows: int = 0
    skipped_locations: dict[str, list[int]] = field(default_factory=dict)
    skipped_summary: list[str] = field(default_factory=list, repr=False, compare=False)

    def summary(self) -> str:
        """Human-readable multi-line summary (what ``sft ingest`` prints)."""
        lines = [f"wrote {self.total_rows} rows to {self.out}"]
        lines += [f"  {name}: {n} rows" for name, n in self.rows_per_file.items()]
        if self.conversations:
            lines.append(f"  {self.conversations} conversation(s) stored with every turn (column conversation)")
        lines += self.skipped_summary
        for name, extra in self.ignored_fields.items():
            lines.append(
                f"  note: {name}: ignored field(s) {', '.join(extra)} (only question, answer and source are kept; "
                f"read a field instead with --map TARGET=FIELD)"
            )
        return "\n".join(lines)


def _check_inputs(inputs, out: str, mapping, fmt, split, overwrite: bool, record_format, on_bad_row: str, creds):
    """``(inputs, policy, fields, plan)``, checked before anything is read: ``plan`` is ``[(path, file kind)]``."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise IngestError("no input files given; usage: sft ingest FILE [FILE ...] --out PATH")
    policy = check_policy(on_bad_row)
    fields = parse_fields(mapping, record_format)
    fmt = normalize_fmt(fmt)
    plan = [(p, detect_file(p, fmt)) for p in inputs]
    if split is not None and not any(kind == "hf" for _, kind in plan):
        raise IngestError(f"--split {split} only applies to Hugging Face dataset directories; drop it")
    check_out(out, overwrite)  # fail before reading gigabytes (write_dataset checks again, cheaply)
    if is_remote(out):
        from sft.data.creds import check_remote_out

        check_remote_out(out, overwrite, creds)  # a wrong key or an existing dataset, before any input is read
    return inputs, policy, fields, plan


@dataclass
class _Tally:
    """What the row stream found: good rows per input, ignored fields per input, and the bad rows."""

    convert: Converter
    policy: str
    counts: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, list[str]] = field(default_factory=dict)
    problems: Problems = field(default_factory=Problems)


def _records(path: str, kind: str, fields: Fields, split: str | None, seen: list[str]):
    """The input's ``(unit, number, record)``; failing to read it (not to write the output) is an IngestError."""
    records = read(path, kind, fields, split, seen)
    while True:
        try:
            item = next(records)
        except StopIteration:
            return
        except OSError as e:
            raise IngestError(f"{path}: cannot read it ({e.strerror or e}); check the file and its permissions") from e
        yield item


def _input_rows(path: str, kind: str, fields: Fields, split: str | None, tally: _Tally):
    """One input's rows (bad ones noted in ``tally``, and the run goes on to find the others); returns their
    number."""
    name = os.path.basename(os.path.normpath(path))
    problems = tally.problems
    n = records_seen = 0
    seen: list[str] = []  # a table's column names (columnar readers fill it in)
    for unit, number, record in _records(path, kind, fields, split, seen):
        records_seen += 1
        if isinstance(record, BadRecord):
            problems.bad_row(path, unit, number, record.message)
            continue
        try:
            row = tally.convert(record, path, unit, number, name)
        except MapError:
            raise  # the mapping itself is wrong: one message, not one per row
        except IngestError as e:
            problems.bad_row(path, unit, number, str(e))
            continue
        n += 1
        if n == 1:  # extra fields: judged on the header / schema, or on the first record of JSON inputs
            extra = extra_fields(seen or (list(record) if isinstance(record, Mapping) else []), fields)
            if extra:
                tally.ignored[path] = extra
        if tally.policy == "skip" or not problems.count:
            yield row  # under "fail", rows after the first problem are only checked, not written
    if records_seen == 0:
        problems.empty_input(path)
    tally.counts[path] = tally.counts.get(path, 0) + n
    return n


def _rows(plan, fields: Fields, split: str | None, tally: _Tally, out: str,
          inputs: list[str]) -> Iterator[dict[str, Any]]:
    """Every input's rows, in order; at the end, the bad-row policy decides whether the write may commit."""
    good = 0
    for path, kind in plan:
        good += yield from _input_rows(path, kind, fields, split, tally)
    problems = tally.problems
    if problems.empty or (problems.count and tally.policy == "fail"):
        raise problems.error(out, inputs, good, tally.policy)
    if good == 0:
        raise IngestError(f"every row of the input is bad ({problems.rows} bad rows); nothing was written to "
                          f"{out}:\n" + "\n".join(f"  {m}" for m in problems.messages))


def ingest(
    inputs: list[str],
    out: str,
    mapping: dict[str, str] | None = None,
    fmt: str | None = None,
    split: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    *,
    record_format: str | None = None,
    on_bad_row: str = "fail",
    creds: Any = None,
) -> IngestReport:
    """Convert ``inputs`` (in order, concatenated) into one Deep Lake dataset at ``out``.

    ``mapping``: target -> source field (targets ``question``, ``answer``, ``source``, ``messages``); a value
    ``a+b`` joins fields. ``fmt``: force a file format for every input (``jsonl``, ``json``, ``csv``, ``tsv``,
    ``parquet``, ``hf``). ``record_format``: force a record format (``qa``, ``chat``, ``sharegpt``, ``lima``,
    ``alpaca``; default: detected per record, see :mod:`sft.data.ingest.formats`). ``split``: the split of a Hugging Face
    ``DatasetDict`` (default ``train``). ``on_bad_row``: ``fail`` reports every bad row and writes nothing,
    ``skip`` writes the good rows (:mod:`sft.data.ingest.badrows`). ``creds``: for an ``s3://`` ``out``, a mapping
    or a JSON file path (:func:`sft.data.creds.resolve`; None: the AWS environment variables).
    Inputs, formats, mapping and ``out`` are checked before anything is read; rows are validated while they are
    written, and any error leaves no output behind.
    """
    inputs, policy, fields, plan = _check_inputs(inputs, out, mapping, fmt, split, overwrite, record_format,
                                                 on_bad_row, creds)
    tally = _Tally(Converter(fields), policy)
    rows = _rows(plan, fields, split, tally, out, inputs)
    total = write_dataset(out, rows, overwrite=overwrite, progress=progress, validate=False, creds=creds)
    problems = tally.problems
    return IngestReport(out=out, total_rows=total, rows_per_file=tally.counts,
                        conversations=tally.convert.conversations, ignored_fields=tally.ignored,
                        skipped_rows=problems.rows,
                        skipped_locations={p: list(v) for p, v in problems.locations.items()},
                        skipped_summary=problems.skipped_summary() if problems.rows else [])
