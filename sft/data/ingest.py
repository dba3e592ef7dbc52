"""Users' files -> a Deep Lake dataset with text columns ``question``, ``answer``, ``source`` (and, for
conversations, ``conversation``).

``write_dataset(out, rows)``
    The one writer (used by ``ingest`` and by the demo-data generator). Atomic: it writes into a sibling temporary
    directory ``OUT.tmp-<pid>-<random>``, commits, then renames it to ``OUT``. On any failure, Ctrl-C included,
    the temporary directory is removed, so ``OUT`` is either the complete new dataset or untouched.
``ingest(inputs, out, ...)``
    Reads JSONL / JSON / CSV / TSV / Parquet files and Hugging Face ``save_to_disk`` directories
    (:mod:`sft.data.readers`), turns records of the known formats -- question/answer with ``--map`` and joins,
    Alpaca, chat ``messages``, ShareGPT ``conversations`` -- into rows (:mod:`sft.data.formats`), validates every
    row *while* writing (one pass, nothing buffered beyond a write batch), applies the bad-row policy
    (:mod:`sft.data.badrows`: every bad row is reported in one run) and returns an :class:`IngestReport`.

Input rules (the CLI's help and the README repeat these):

* Mapping ``{"question": "instruction", "answer": "output"}`` reads target column <- source field. Defaults:
  ``question``, ``answer``; ``source`` is the input's file name unless mapped; ``messages`` names the chat field.
* Extra fields (columns nothing is mapped from) are ignored, and named per input in the summary
  (:attr:`IngestReport.ignored_fields`): judged on the header / schema of tables, on the first record of JSON inputs.
* Writes are verified: Deep Lake 4.7 does not report failed writes (a full disk, ``ulimit -f``), so the committed
  dataset is read back and compared (per-column digests) before it is renamed into place.
* Text policy: see :mod:`sft.data.formats`. Deep Lake also stores an empty string as None, so empty values could
  not round-trip anyway.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sft.data.badrows import Problems, check_policy
from sft.data.formats import Converter, extra_fields, parse_fields
from sft.data.formats import describe as _describe
from sft.data.readers import FORMATS, BadRecord, normalize_fmt, read
from sft.data.readers import detect as detect_file
from sft.errors import IngestError

#: Columns of every dataset this module writes (all Deep Lake Text).
COLUMNS = ("question", "answer", "source")
#: Optional text column: the whole conversation as JSON, for rows that hold more than one question and answer
#: (see sft.data.formats for why). Added to a dataset only when its first such row is written.
CONVERSATION = "conversation"

#: Rows per ``ds.append``. Measured on the 2-core build machine (deeplake 4.7.4, ~60-byte rows): row-by-row
#: append ~3.5-11 k rows/s, batches of 256 ~37 k, 1024 ~78 k, 4096 ~82 k, 16384 ~87 k rows/s. 2048 gets nearly
#: all the gain while keeping a batch's memory small for long answers.
WRITE_BATCH = 2048

__all__ = ["COLUMNS", "CONVERSATION", "FORMATS", "IngestReport", "ingest", "write_dataset"]


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


# ============================================================================================== writer


def _is_remote(path: str) -> bool:
    from sft.data.source import is_remote

    return is_remote(path)


def _check_out(out: str, overwrite: bool) -> str:
    """Validate the output path before any input is read; return it absolute."""
    if not isinstance(out, str) or not out.strip():
        raise IngestError(f"output path must be a non-empty string, got {out!r}; pass --out PATH")
    if _is_remote(out):
        if not out.lower().startswith("s3://"):  # the one object store this is tested against (tests/test_s3.py)
            raise IngestError(f"--out {out}: ingest writes local paths and s3:// object storage (S3-compatible); "
                              f"write locally, then copy with deeplake.copy")
        return out  # checked against the store itself by write_dataset (sft.data.creds.check_remote_out)
    path = os.path.abspath(os.path.expanduser(out[len("file://"):] if out.startswith("file://") else out))
    if os.path.lexists(path):
        if not overwrite:
            raise IngestError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
        import deeplake

        is_empty_dir = os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
        if not (is_empty_dir or (os.path.isdir(path) and deeplake.exists(path))):
            # --overwrite deletes the old output: restrict that to things this tool could have made, so a slip
            # like `--out ~ --overwrite` cannot remove a home directory.
            raise IngestError(
                f"{out} exists and is not a Deep Lake dataset; --overwrite only replaces Deep Lake datasets. "
                f"Choose another --out, or remove {out} yourself if you mean to."
            )
    from sft.preflight import unwritable_reason

    reason = unwritable_reason(os.path.dirname(path))
    if reason is not None:
        raise IngestError(f"--out {out}: cannot create the dataset there: {reason}. Choose a writable --out")
    return path


def _check_row(row: Any, i: int) -> None:
    # Generic check for rows that did not come through ingest()'s readers (e.g. the demo generator).
    if not isinstance(row, Mapping):
        raise IngestError(f"row {i}: expected a dict with {', '.join(COLUMNS)}, got {type(row).__name__}")
    for c in COLUMNS:
        v = row.get(c)
        if not isinstance(v, str) or not v.strip():
            raise IngestError(
                f"row {i}: field {c!r} must be a non-empty string, got {_describe(v)}"
                + ("" if c in row else f" (the row has: {', '.join(map(str, row)) or 'no fields'})")
            )


def _replace(tmp: str, out: str) -> None:
    """Move the finished ``tmp`` to ``out``; an existing ``out`` (already cleared by _check_out) is swapped out."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    old = f"{out}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # put the previous dataset back; never leave the user with neither
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_dataset(
    out: str,
    rows: Iterable[Mapping[str, str]],
    overwrite: bool = False,
    progress: bool = True,
    *,
    total: int | None = None,
    batch_size: int = WRITE_BATCH,
    validate: bool = True,
    creds: Any = None,
) -> int:
    """Write ``rows`` (dicts with non-empty ``question``, ``answer``, ``source`` strings) to a new local Deep Lake
    dataset at ``out``, atomically. Returns the number of rows written.

    ``rows`` is consumed once, lazily: a generator that validates as it goes (as :func:`ingest` passes) can abort the
    write by raising; the temporary directory is then removed and the exception propagates unchanged. Refuses an
    existing ``out`` unless ``overwrite`` (then only if ``out`` is a Deep Lake dataset or an empty directory). Zero
    rows is an error (training refuses empty datasets). ``total`` only sizes the progress bar. ``validate=False``
    skips the per-row check for callers that already validated (ingest does, with better messages).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = _check_out(out, overwrite)
    created: list[str] = []  # parent folders this call creates: removed again if the write fails (no partial output)
    remote, kw, replace_remote = _is_remote(out), {}, False
    if remote:
        from sft.data.creds import check_remote_out

        # No rename on object stores: the dataset is written in place and deleted again if anything fails.
        kw, replace_remote = check_remote_out(out, overwrite, creds)
        tmp = out
    else:
        parent = os.path.dirname(path)
        d = parent
        while not os.path.lexists(d) and os.path.dirname(d) != d:
            created.append(d)
            d = os.path.dirname(d)
        os.makedirs(parent, exist_ok=True)
        # A sibling (same filesystem) so the final os.rename is atomic; pid + random so concurrent writers never
        # collide.
        tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"

    import deeplake
    from tqdm.auto import tqdm

    ds = None
    n = 0
    # What was appended, per column (order-preserving, independent of the batch size): compared with what reads
    # back before the dataset is renamed into place, because Deep Lake 4.7 does not report failed writes.
    digests = {c: hashlib.blake2b(digest_size=16) for c in (*COLUMNS, CONVERSATION)}
    columns = list(COLUMNS)  # + CONVERSATION once a row has one

    def append(buf: dict[str, list[str]]) -> None:
        if CONVERSATION not in columns and any(buf[CONVERSATION]):
            # First conversation: the column is added now (earlier rows read None = no conversation), so datasets
            # without conversations keep exactly the old three-column schema.
            ds.add_column(CONVERSATION, deeplake.types.Text())
            ds.commit()
            columns.append(CONVERSATION)
        ds.append({c: buf[c] for c in columns})  # columnar dict of lists: one call per batch (see WRITE_BATCH)
        for c in digests:
            digests[c].update(_digest_bytes(buf[c]))

    try:
        if replace_remote:
            deeplake.delete(out, **kw)
        ds = deeplake.create(tmp, **kw)
        for c in COLUMNS:
            ds.add_column(c, deeplake.types.Text())
        # Deep Lake 4.7 writes schema changes to _deeplake_log/ from background tasks ("detached promises") that
        # outlive the Python handle: a failure right after add_column, then rmtree, raced with them and left a
        # half-deleted temp dir behind (~15% of tries). commit() waits for them; later appends showed no such race.
        ds.commit()
        buf: dict[str, list[str]] = {c: [] for c in digests}
        with tqdm(total=total, unit=" rows", desc=f"writing {os.path.basename(path)}", disable=not progress,
                  dynamic_ncols=True) as bar:
            for row in rows:
                n += 1
                if validate:
                    _check_row(row, n)
                for c in COLUMNS:
                    buf[c].append(row[c])
                buf[CONVERSATION].append(row.get(CONVERSATION) or "")
                if len(buf["question"]) >= batch_size:
                    append(buf)
                    bar.update(len(buf["question"]))
                    buf = {c: [] for c in digests}
            if buf["question"]:
                append(buf)
                bar.update(len(buf["question"]))
        if n == 0:
            raise IngestError(f"no rows to write to {out}: the input is empty")
        ds.commit()
        ds = None  # drop the handle before the directory moves under it
        problem = _verify(tmp, n, {c: digests[c] for c in columns}, batch_size, kw)
        if problem is not None:
            raise _write_failed(out, path, tmp, f"the dataset does not read back as written ({problem})")
        if not remote:
            _replace(tmp, path)
    except BaseException as e:
        ds = None
        if remote:
            _delete_remote(out, kw)
            if isinstance(e, Exception) and not isinstance(e, IngestError) and _is_storage_error(e):
                raise IngestError(f"--out {out}: writing the dataset failed: {type(e).__name__}: "
                                  f"{(str(e).splitlines() or [''])[0]}. Nothing was left at {out}") from e
            raise
        if isinstance(e, Exception) and not isinstance(e, IngestError) and _is_storage_error(e):
            # a write (or the commit) failed outright: name the cause while the temp dir still shows it
            err = _write_failed(out, path, tmp, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
            _remove_tree(tmp)
            _remove_empty(created)
            raise err from e
        _remove_tree(tmp)
        _remove_empty(created)
        raise
    if not remote and os.path.exists(tmp):  # a late background write re-created the temp path after the rename
        _remove_tree(tmp)
    return n


def _digest_bytes(values: list[str]) -> bytes:
    # every value followed by a NUL: the digest of a column does not depend on how its rows were batched
    return ("\0".join(values) + "\0").encode("utf-8", "surrogatepass")


def _verify(tmp: str, n: int, digests: dict, batch_size: int, kw: dict | None = None) -> str | None:
    """Read the committed dataset back; a description of the first difference, or None when it is what was written.

    Deep Lake 4.7 ignores failed and short writes (a full disk, ``ulimit -f``): the dataset commits fine and reads
    back zero bytes where the data should be. Reading back costs ~20% of the write time."""
    import deeplake

    try:
        ds = deeplake.open_read_only(tmp, **(kw or {}))
        if len(ds) != n:
            return f"{len(ds)} rows instead of {n}"
        step = max(batch_size, 8192)
        for c in digests:
            h = hashlib.blake2b(digest_size=16)
            for lo in range(0, n, step):
                values = ds[c][lo:lo + step]
                if c == CONVERSATION:  # optional per row: Deep Lake reads the "" of rows without one as None
                    values = ["" if v is None else v for v in values]
                if any(not isinstance(v, str) for v in values):
                    return f"column {c!r} has rows that are not text"
                h.update(_digest_bytes(values))
            if h.digest() != digests[c].digest():
                return f"column {c!r} differs"
    except Exception as e:  # deeplake's errors share no base class beyond Exception
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    return None


def _is_storage_error(e: BaseException) -> bool:
    """An error of the file system or of Deep Lake's storage layer (not of the rows or of this code)."""
    from sft.preflight import is_disk_full

    return isinstance(e, OSError) or type(e).__module__.startswith("deeplake") or is_disk_full(e)


def _write_failed(out: str, path: str, tmp: str, what: str) -> IngestError:
    from sft.preflight import write_failure_reason

    reason = write_failure_reason(os.path.dirname(path), tmp)
    return IngestError(
        f"--out {out}: writing the dataset failed: {what}; likely cause: {reason}. Nothing was written to {out}. "
        f"Free space (or raise the limit) and run again, or choose another --out"
    )


def _remove_empty(folders: list[str]) -> None:
    """Remove folders (deepest first) that are still empty."""
    for d in folders:
        try:
            os.rmdir(d)
        except OSError:
            return


def _delete_remote(out: str, kw: dict) -> None:
    """Delete a half-written dataset on object storage (best effort: a store that is gone cannot be cleaned)."""
    import deeplake

    try:
        if deeplake.exists(out, **kw):
            deeplake.delete(out, **kw)
    except Exception:  # the original error is what the user needs to see
        pass


def _remove_tree(path: str, settle_s: float = 0.01, tries: int = 50) -> None:
    """rmtree that also wins against Deep Lake background writers still flushing into ``path`` (see above)."""
    for _ in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(settle_s)  # give an in-flight write the chance to re-create the directory, then look again
        if not os.path.exists(path):
            return


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
    ``parquet``, ``hf``). ``record_format``: force a record format (``qa``, ``chat``, ``sharegpt``, ``alpaca``;
    default: detected per record, see :mod:`sft.data.formats`). ``split``: the split of a Hugging Face
    ``DatasetDict`` (default ``train``). ``on_bad_row``: ``fail`` reports every bad row and writes nothing,
    ``skip`` writes the good rows (:mod:`sft.data.badrows`). ``creds``: for an ``s3://`` ``out``, a mapping or a
    JSON file path (:func:`sft.data.creds.resolve`; None: the AWS environment variables).
    Inputs, formats, mapping and ``out`` are checked before anything is read; rows are validated while they are
    written, and any error leaves no output behind.
    """
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
    _check_out(out, overwrite)  # fail before reading gigabytes (write_dataset checks again, cheaply)
    if _is_remote(out):
        from sft.data.creds import check_remote_out

        check_remote_out(out, overwrite, creds)  # a wrong key or an existing dataset, before any input is read

    convert = Converter(fields)
    counts: dict[str, int] = {}
    ignored: dict[str, list[str]] = {}
    problems = Problems()

    def rows() -> Iterator[dict[str, Any]]:
        good = 0
        for path, kind in plan:
            name = os.path.basename(os.path.normpath(path))
            n = records_seen = 0
            seen: list[str] = []  # a table's column names (columnar readers fill it in)
            records = read(path, kind, fields, split, seen)
            while True:
                try:
                    unit, number, record = next(records)
                except StopIteration:
                    break
                except OSError as e:  # reading an input (not writing the output) failed
                    raise IngestError(
                        f"{path}: cannot read it ({e.strerror or e}); check the file and its permissions"
                    ) from e
                records_seen += 1
                if isinstance(record, BadRecord):
                    problems.bad_row(path, unit, number, record.message)
                    continue
                try:
                    row = convert(record, path, unit, number, name)
                except IngestError as e:  # a bad row: noted, and the run goes on to find the others
                    problems.bad_row(path, unit, number, str(e))
                    continue
                n += 1
                if n == 1:  # extra fields: judged on the header / schema, or on the first record of JSON inputs
                    extra = extra_fields(seen or (list(record) if isinstance(record, Mapping) else []), fields)
                    if extra:
                        ignored[path] = extra
                if policy == "skip" or not problems.count:
                    yield row  # under "fail", rows after the first problem are only checked, not written
            if records_seen == 0:
                problems.empty_input(path)
            counts[path] = counts.get(path, 0) + n
            good += n
        if problems.empty or (problems.count and policy == "fail"):
            raise problems.error(out, inputs, good, policy)
        if good == 0:
            raise IngestError(f"every row of the input is bad ({problems.rows} bad rows); nothing was written to "
                              f"{out}:\n" + "\n".join(f"  {m}" for m in problems.messages))

    total = write_dataset(out, rows(), overwrite=overwrite, progress=progress, validate=False, creds=creds)
    return IngestReport(out=out, total_rows=total, rows_per_file=counts, conversations=convert.conversations,
                        ignored_fields=ignored, skipped_rows=problems.rows,
                        skipped_locations={p: list(v) for p, v in problems.locations.items()},
                        skipped_summary=problems.skipped_summary() if problems.rows else [])
