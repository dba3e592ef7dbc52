"""Users' files -> a Deep Lake dataset with text columns ``question``, ``answer``, ``source``.

``write_dataset(out, rows)``
    The one writer (used by ``ingest`` and by the demo-data generator). Atomic: it writes into a sibling temporary
    directory ``OUT.tmp-<pid>-<random>``, commits, then renames it to ``OUT``. On any failure, Ctrl-C included,
    the temporary directory is removed, so ``OUT`` is either the complete new dataset or untouched.
``ingest(inputs, out, ...)``
    Reads JSONL / JSON / CSV / TSV / Parquet files and Hugging Face ``save_to_disk`` directories, maps fields,
    validates every row *while* writing (one pass, nothing buffered beyond a write batch) and returns an
    :class:`IngestReport`.

Input rules (the CLI's help and the README repeat these):

* Formats come from the extension (``.jsonl``/``.ndjson``, ``.json``, ``.csv``, ``.tsv``, ``.parquet``/``.pq``; a
  directory is a Hugging Face dataset) or from ``fmt`` (``--format``) for every input. A ``.json`` file holds either
  a list of objects or, if it starts with ``{``, one object per line (many ".json" files in the wild are JSONL).
* Mapping ``{"question": "instruction", "answer": "output"}`` reads target column <- source field. Defaults:
  ``question``, ``answer``; ``source`` is the input's file name unless mapped; ``messages`` names the chat field.
* Extra fields (columns nothing is mapped from) are ignored, and named per input in the summary
  (:attr:`IngestReport.ignored_fields`): judged on the header / schema of tables, on the first record of JSON inputs.
* Writes are verified: Deep Lake 4.7 does not report failed writes (a full disk, ``ulimit -f``), so the committed
  dataset is read back and compared (per-column digests) before it is renamed into place.
* Text policy: question, answer and a mapped source must be ``str`` and not blank. Anything else (numbers, bools,
  None/null, lists, dicts) is an error naming file, row and field -- never silently ``str()``-ed, because a
  number where text was expected almost always means a wrong ``--map``, and ``str(3.0)`` would train on "3.0".
  Deep Lake also stores an empty string as None, so empty values could not round-trip anyway.
* Chat records (``{"messages": [{"role", "content"}, ...]}``; auto-detected when a record has ``messages`` and no
  question field): question = the first user message; answer = the message right after it, which must be
  ``assistant``. ``system`` (or ``developer``) messages before the first user message are prepended to the
  question, separated by a blank line, so the instruction the answer depends on is not lost. Conversations longer
  than one exchange keep only the first exchange (later turns depend on context a single question/answer pair
  cannot carry); they are counted in :attr:`IngestReport.truncated_conversations`, never dropped silently.
* Locations in errors are 1-based: ``line N`` for JSONL and CSV (the physical line where the record starts, header
  = line 1), ``record N`` for a JSON list, ``row N`` for Parquet and Hugging Face datasets.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sft.errors import IngestError

#: Columns of every dataset this module writes (all Deep Lake Text).
COLUMNS = ("question", "answer", "source")

#: Rows per ``ds.append``. Measured on the 2-core build machine (deeplake 4.7.4, ~60-byte rows): row-by-row
#: append ~3.5-11 k rows/s, batches of 256 ~37 k, 1024 ~78 k, 4096 ~82 k, 16384 ~87 k rows/s. 2048 gets nearly
#: all the gain while keeping a batch's memory small for long answers.
WRITE_BATCH = 2048

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
_MAP_TARGETS = ("question", "answer", "source", "messages")
_SYSTEM_ROLES = ("system", "developer")
_SUPPORTED = (
    "supported: .jsonl/.ndjson, .json (list of objects or JSON lines), .csv, .tsv, .parquet/.pq, and Hugging Face "
    "datasets saved with save_to_disk (a directory); or name the format with --format "
    + "|".join(FORMATS)
)


@dataclass
class IngestReport:
    """What :func:`ingest` wrote."""

    out: str
    total_rows: int
    #: rows taken from each input, keyed by the input path as given, in input order
    rows_per_file: dict[str, int] = field(default_factory=dict)
    #: chat conversations with more than one exchange, of which only the first exchange was kept
    truncated_conversations: int = 0
    #: fields (columns) of each input that were not read, keyed like ``rows_per_file``: extra fields are ignored,
    #: and named in the summary so that a forgotten one (e.g. Alpaca's ``input``) is noticed
    ignored_fields: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        """Human-readable multi-line summary (what ``sft ingest`` prints)."""
        lines = [f"wrote {self.total_rows} rows to {self.out}"]
        lines += [f"  {name}: {n} rows" for name, n in self.rows_per_file.items()]
        if self.truncated_conversations:
            lines.append(
                f"  {self.truncated_conversations} multi-turn conversation(s): only the first user/assistant "
                f"exchange was kept"
            )
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
        # Atomic rename exists only on a local filesystem; an object-store upload is a separate, explicit step.
        raise IngestError(
            f"--out {out}: ingest writes local datasets only. Write locally, then copy with "
            f"`python -c \"import deeplake; deeplake.copy('LOCAL_PATH', '{out}')\"`."
        )
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
    parent = os.path.dirname(path)
    created = []  # parent folders this call creates: removed again if the write fails (no partial output)
    d = parent
    while not os.path.lexists(d) and os.path.dirname(d) != d:
        created.append(d)
        d = os.path.dirname(d)
    os.makedirs(parent, exist_ok=True)
    # A sibling (same filesystem) so the final os.rename is atomic; pid + random so concurrent writers never collide.
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"

    import deeplake
    from tqdm.auto import tqdm

    ds = None
    n = 0
    # What was appended, per column (order-preserving, independent of the batch size): compared with what reads
    # back before the dataset is renamed into place, because Deep Lake 4.7 does not report failed writes.
    digests = {c: hashlib.blake2b(digest_size=16) for c in COLUMNS}

    def append(buf: dict[str, list[str]]) -> None:
        ds.append(buf)  # columnar dict of lists: one call per batch (see WRITE_BATCH)
        for c in COLUMNS:
            digests[c].update(_digest_bytes(buf[c]))

    try:
        ds = deeplake.create(tmp)
        for c in COLUMNS:
            ds.add_column(c, deeplake.types.Text())
        # Deep Lake 4.7 writes schema changes to _deeplake_log/ from background tasks ("detached promises") that
        # outlive the Python handle: a failure right after add_column, then rmtree, raced with them and left a
        # half-deleted temp dir behind (~15% of tries). commit() waits for them; later appends showed no such race.
        ds.commit()
        buf: dict[str, list[str]] = {c: [] for c in COLUMNS}
        with tqdm(total=total, unit=" rows", desc=f"writing {os.path.basename(path)}", disable=not progress,
                  dynamic_ncols=True) as bar:
            for row in rows:
                n += 1
                if validate:
                    _check_row(row, n)
                for c in COLUMNS:
                    buf[c].append(row[c])
                if len(buf["question"]) >= batch_size:
                    append(buf)
                    bar.update(len(buf["question"]))
                    buf = {c: [] for c in COLUMNS}
            if buf["question"]:
                append(buf)
                bar.update(len(buf["question"]))
        if n == 0:
            raise IngestError(f"no rows to write to {out}: the input is empty")
        ds.commit()
        ds = None  # drop the handle before the directory moves under it
        problem = _verify(tmp, n, digests, batch_size)
        if problem is not None:
            raise _write_failed(out, path, tmp, f"the dataset does not read back as written ({problem})")
        _replace(tmp, path)
    except BaseException as e:
        ds = None
        if isinstance(e, Exception) and not isinstance(e, IngestError) and _is_storage_error(e):
            # a write (or the commit) failed outright: name the cause while the temp dir still shows it
            err = _write_failed(out, path, tmp, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
            _remove_tree(tmp)
            _remove_empty(created)
            raise err from e
        _remove_tree(tmp)
        _remove_empty(created)
        raise
    if os.path.exists(tmp):  # a late background write re-created the temp path after the rename
        _remove_tree(tmp)
    return n


def _digest_bytes(values: list[str]) -> bytes:
    # every value followed by a NUL: the digest of a column does not depend on how its rows were batched
    return ("\0".join(values) + "\0").encode("utf-8", "surrogatepass")


def _verify(tmp: str, n: int, digests: dict, batch_size: int) -> str | None:
    """Read the committed dataset back; a description of the first difference, or None when it is what was written.

    Deep Lake 4.7 ignores failed and short writes (a full disk, ``ulimit -f``): the dataset commits fine and reads
    back zero bytes where the data should be. Reading back costs ~20% of the write time."""
    import deeplake

    try:
        ds = deeplake.open_read_only(tmp)
        if len(ds) != n:
            return f"{len(ds)} rows instead of {n}"
        step = max(batch_size, 8192)
        for c in COLUMNS:
            h = hashlib.blake2b(digest_size=16)
            for lo in range(0, n, step):
                values = ds[c][lo:lo + step]
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


def _remove_tree(path: str, settle_s: float = 0.01, tries: int = 50) -> None:
    """rmtree that also wins against Deep Lake background writers still flushing into ``path`` (see above)."""
    for _ in range(tries):
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(settle_s)  # give an in-flight write the chance to re-create the directory, then look again
        if not os.path.exists(path):
            return


# ============================================================================================== ingest


@dataclass(frozen=True)
class _Fields:
    question: str = "question"
    answer: str = "answer"
    source: str | None = None  # None: use the input's file name
    messages: str = "messages"


def _fields(mapping: Mapping[str, str] | None) -> _Fields:
    mapping = dict(mapping or {})
    for target, name in mapping.items():
        if target not in _MAP_TARGETS:
            raise IngestError(
                f"--map {target}={name}: unknown target {target!r}; targets are {', '.join(_MAP_TARGETS)}"
            )
        if not isinstance(name, str) or not name:
            raise IngestError(f"--map {target}=...: the field name must be a non-empty string, got {name!r}")
    return _Fields(**mapping)


def _describe(v: Any) -> str:
    if v is None:
        return "null/None"
    if isinstance(v, str):
        return "an empty string" if not v.strip() else repr(v[:40])
    r = repr(v)
    return f"{type(v).__name__} {r[:40] + '...' if len(r) > 40 else r}"


def _text(v: Any, where: str, name: str, what: str) -> str:
    """Return ``v`` if it is non-blank text, else raise an IngestError naming where/field."""
    if isinstance(v, str) and v.strip():
        return v
    if isinstance(v, str):
        raise IngestError(
            f"{where}: field {name!r} ({what}) is empty. Every row needs a non-empty question and answer; "
            f"remove or fill the row."
        )
    raise IngestError(
        f"{where}: field {name!r} ({what}) must be text, got {_describe(v)}. Only strings are ingested (numbers "
        f"and nulls are not converted); fix the value or --map {what}=FIELD to the right field."
    )


def _missing(where: str, record: Mapping[str, Any], name: str, target: str) -> IngestError:
    have = ", ".join(map(str, record)) or "no fields"
    return IngestError(
        f"{where}: missing field {name!r} for {target} (the record has: {have}). Map your field names with "
        f"--map {target}=FIELD, e.g. --map question=instruction answer=output"
    )


def _chat(messages: Any, where: str, name: str) -> tuple[str, str, bool]:
    """First exchange of a chat record -> (question, answer, truncated). See the module docstring for the rules."""
    if not isinstance(messages, list) or not messages:
        raise IngestError(
            f"{where}: field {name!r} must be a non-empty list of {{\"role\", \"content\"}} objects, "
            f"got {_describe(messages)}"
        )

    def msg(i: int) -> tuple[str, Any]:
        m = messages[i]
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise IngestError(
                f"{where}: {name}[{i}] must be an object with a string \"role\" and a \"content\", "
                f"got {_describe(m)}"
            )
        return m["role"], m["content"]

    systems: list[str] = []
    for i in range(len(messages)):
        role, content = msg(i)
        if role in _SYSTEM_ROLES:
            if content is not None and not isinstance(content, str):
                _text(content, where, f"{name}[{i}].content", "system prompt")
            if content and content.strip():
                systems.append(content)  # an empty system prompt adds nothing
            continue
        if role == "user":
            user = i
            break
        raise IngestError(
            f"{where}: {name}[{i}] has role {role!r} before any user message; a conversation must start with "
            f"optional system messages and then a user message"
        )
    else:
        raise IngestError(f"{where}: field {name!r} has no user message")
    question = _text(msg(user)[1], where, f"{name}[{user}].content", "question")
    if user + 1 >= len(messages):
        raise IngestError(f"{where}: {name}[{user}] (the first user message) has no assistant reply after it")
    role, content = msg(user + 1)
    if role != "assistant":
        raise IngestError(
            f"{where}: {name}[{user + 1}] has role {role!r}; expected the assistant's reply to {name}[{user}]"
        )
    answer = _text(content, where, f"{name}[{user + 1}].content", "answer")
    return "\n\n".join([*systems, question]), answer, len(messages) > user + 2


class _Converter:
    """Record -> row, with the field mapping, text policy and chat rules; counts truncated conversations."""

    def __init__(self, fields: _Fields):
        self.f = fields
        self.truncated = 0

    def __call__(self, record: Any, path: str, unit: str, n: int, default_source: str) -> dict[str, str]:
        # Fast path for the common valid plain record: no location string is built unless something is wrong
        # (building "file line N" for every row cost ~15% of ingest time).
        f = self.f
        if type(record) is dict:
            q = record.get(f.question)
            a = record.get(f.answer)
            s = default_source if f.source is None else record.get(f.source)
            if (type(q) is str and type(a) is str and type(s) is str and q and a and s
                    and not q.isspace() and not a.isspace() and not s.isspace()):
                return {"question": q, "answer": a, "source": s}
        return self.convert(record, f"{path} {unit} {n}", default_source)

    def convert(self, record: Any, where: str, default_source: str) -> dict[str, str]:
        """The full rules, with error messages naming ``where``."""
        f = self.f
        if not isinstance(record, Mapping):
            raise IngestError(f"{where}: expected an object with fields, got {_describe(record)}")
        if f.question in record:
            if f.answer not in record:
                raise _missing(where, record, f.answer, "answer")
            q = _text(record[f.question], where, f.question, "question")
            a = _text(record[f.answer], where, f.answer, "answer")
        elif f.messages in record:
            q, a, truncated = _chat(record[f.messages], where, f.messages)
            self.truncated += truncated
        else:
            raise _missing(where, record, f.question, "question")
        if f.source is None:
            s = default_source
        elif f.source in record:
            s = _text(record[f.source], where, f.source, "source")
        else:
            raise _missing(where, record, f.source, "source")
        return {"question": q, "answer": a, "source": s}


# ---------------------------------------------------------------------------------------------- format detection


def _is_hf_dir(path: str) -> bool:
    # What datasets' save_to_disk writes: dataset_dict.json for a DatasetDict, state.json (+ arrow files) for one split.
    return any(os.path.isfile(os.path.join(path, m)) for m in ("dataset_dict.json", "state.json"))


def _detect(path: str, fmt: str | None) -> str:
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


def _normalize_fmt(fmt: str | None) -> str | None:
    if fmt is None:
        return None
    f = _FORMAT_ALIASES.get(fmt.lower().lstrip("."), fmt.lower().lstrip("."))
    if f not in FORMATS:
        raise IngestError(f"--format {fmt}: unknown format; {_SUPPORTED}")
    return f


# ---------------------------------------------------------------------------------------------- readers
# Each reader yields (unit, number, record), e.g. ("line", 3, {...}); with the path that makes the location
# "data.jsonl line 3" in messages. _Converter turns records into rows.
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


def _read_jsonl(path: str, fields: _Fields, split: str | None, seen: list[str] | None = None
                ) -> Iterator[tuple[str, int, Any]]:
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue  # blank lines (often a trailing newline) are not records
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise IngestError(
                        f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno}); each line must be one "
                        f"JSON object"
                    ) from None
                if "\\u" in line and _SURROGATE_ESCAPE.search(line):
                    _check_surrogates(record, f"{path} line {lineno}")
                yield "line", lineno, record
    except UnicodeDecodeError as e:
        raise _decode_error(path, e) from None


def _read_json(path: str, fields: _Fields, split: str | None, seen: list[str] | None = None
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
        _check_surrogates(record, f"{path} record {i}")
        yield "record", i, record


def _read_csv(
    path: str, fields: _Fields, split: str | None, seen: list[str] | None = None, delimiter: str = ","
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
                    raise IngestError(
                        f"{path} line {before + 1}: {len(values)} fields but the header has {len(names)}; check "
                        f"quoting and delimiters (a comma inside a value needs double quotes)"
                    )
                yield "line", before + 1, dict(zip(names, values))
    except UnicodeDecodeError as e:
        raise _decode_error(path, e) from None


def _read_tsv(path: str, fields: _Fields, split: str | None, seen: list[str] | None = None
              ) -> Iterator[tuple[str, int, Any]]:
    return _read_csv(path, fields, split, seen, delimiter="\t")


def _needed(names: list[str], fields: _Fields) -> list[tuple[str, str]]:
    """(field, target) pairs a record or table with these field names is read from."""
    if fields.question in names:
        needed = [(fields.question, "question"), (fields.answer, "answer")]
    elif fields.messages in names:
        needed = [(fields.messages, "messages")]
    else:
        needed = [(fields.question, "question")]
    if fields.source is not None:
        needed.append((fields.source, "source"))
    return needed


def _extra_fields(names: list[str], fields: _Fields) -> list[str]:
    """Field names that are not read (the extra-columns policy: ignored, and named in the ingest summary)."""
    used = {name for name, _ in _needed(names, fields)}
    return [str(x) for x in names if x not in used]


def _check_columns(path: str, where: str, names: list[str], fields: _Fields) -> list[str]:
    """Schema-level field check for columnar inputs; returns the columns to read."""
    needed = _needed(names, fields)
    for name, target in needed:
        if name not in names:
            raise IngestError(
                f"{path} {where}: no column {name!r} for {target} (columns: {', '.join(names) or 'none'}). Map "
                f"your column names with --map {target}=COLUMN, e.g. --map question=instruction answer=output"
            )
    return list(dict.fromkeys(name for name, _ in needed))


def _read_parquet(path: str, fields: _Fields, split: str | None, seen: list[str] | None = None
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


def _read_hf(path: str, fields: _Fields, split: str | None, seen: list[str] | None = None
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


_READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json,
    "csv": _read_csv,
    "tsv": _read_tsv,
    "parquet": _read_parquet,
    "hf": _read_hf,
}


def ingest(
    inputs: list[str],
    out: str,
    mapping: dict[str, str] | None = None,
    fmt: str | None = None,
    split: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> IngestReport:
    """Convert ``inputs`` (in order, concatenated) into one Deep Lake dataset at ``out``.

    ``mapping``: target -> source field (targets ``question``, ``answer``, ``source``, ``messages``).
    ``fmt``: force a format for every input (``jsonl``, ``json``, ``csv``, ``tsv``, ``parquet``, ``hf``).
    ``split``: the split of a Hugging Face ``DatasetDict`` (default ``train``).
    Inputs, formats, mapping and ``out`` are checked before anything is read; rows are validated while they are
    written, and any error (an :class:`IngestError` naming file, row and field) leaves no output behind.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise IngestError("no input files given; usage: sft ingest FILE [FILE ...] --out PATH")
    fields = _fields(mapping)
    fmt = _normalize_fmt(fmt)
    plan = [(p, _detect(p, fmt)) for p in inputs]
    if split is not None and not any(kind == "hf" for _, kind in plan):
        raise IngestError(f"--split {split} only applies to Hugging Face dataset directories; drop it")
    _check_out(out, overwrite)  # fail before reading gigabytes (write_dataset checks again, cheaply)

    convert = _Converter(fields)
    counts: dict[str, int] = {}
    ignored: dict[str, list[str]] = {}

    def rows() -> Iterator[dict[str, str]]:
        for path, kind in plan:
            name = os.path.basename(os.path.normpath(path))
            n = 0
            seen: list[str] = []  # a table's column names (columnar readers fill it in)
            records = _READERS[kind](path, fields, split, seen)
            while True:
                try:
                    unit, number, record = next(records)
                except StopIteration:
                    break
                except OSError as e:  # reading an input (not writing the output) failed
                    raise IngestError(
                        f"{path}: cannot read it ({e.strerror or e}); check the file and its permissions"
                    ) from e
                yield convert(record, path, unit, number, name)
                n += 1
                if n == 1:  # extra fields: judged on the header / schema, or on the first record of JSON inputs
                    extra = _extra_fields(seen or (list(record) if isinstance(record, Mapping) else []), fields)
                    if extra:
                        ignored[path] = extra
            if n == 0:
                raise IngestError(f"{path}: no rows (the file holds no records); remove it from the inputs")
            counts[path] = counts.get(path, 0) + n

    total = write_dataset(out, rows(), overwrite=overwrite, progress=progress, validate=False)
    return IngestReport(out=out, total_rows=total, rows_per_file=counts,
                        truncated_conversations=convert.truncated, ignored_fields=ignored)
