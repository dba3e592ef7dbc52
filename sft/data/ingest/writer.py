"""The one Deep Lake writer: rows -> a dataset with text columns ``question``, ``answer``, ``source`` (and, for
conversations, ``conversation``), written atomically and verified.

Atomic: a local dataset is written into a sibling temporary directory ``OUT.tmp-<pid>-<random>``, committed, read
back and compared, then renamed to ``OUT``. On any failure, Ctrl-C included, the temporary directory is removed, so
``OUT`` is either the complete new dataset or untouched. Object stores have no rename: an ``s3://`` dataset is
written in place and deleted again if anything fails.

Writes are verified: Deep Lake 4.7 does not report failed writes (a full disk, ``ulimit -f``), so the committed
dataset is read back and compared (per-column digests) before it is renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sft.data.ingest.formats import describe as _describe
from sft.errors import IngestError

#: Columns of every dataset this module writes (all Deep Lake Text).
COLUMNS = ("question", "answer", "source")
#: Optional text column: the whole conversation as JSON, for rows that hold more than one question and answer
#: (see sft.data.ingest.formats for why). Added to a dataset only when its first such row is written.
CONVERSATION = "conversation"

#: Rows per ``ds.append``. Measured on the 2-core build machine (deeplake 4.7.4, ~60-byte rows): row-by-row
#: append ~3.5-11 k rows/s, batches of 256 ~37 k, 1024 ~78 k, 4096 ~82 k, 16384 ~87 k rows/s. 2048 gets nearly
#: all the gain while keeping a batch's memory small for long answers.
WRITE_BATCH = 2048


def _is_remote(path: str) -> bool:
    from sft.data.source import is_remote

    return is_remote(path)


def check_out(out: str, overwrite: bool) -> str:
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
    """Move the finished ``tmp`` to ``out``; an existing ``out`` (already cleared by check_out) is swapped out."""
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


@dataclass
class _Target:
    """Where the dataset goes: ``out`` as given, ``path`` (absolute, local), ``tmp`` (what is written: a sibling
    of ``path``, or ``out`` itself on object storage) and the parent folders made for it (deepest first)."""

    out: str
    path: str
    tmp: str
    remote: bool
    kw: dict = field(default_factory=dict)  # deeplake keyword args (credentials) for a remote out
    replace_remote: bool = False  # an existing remote dataset to delete just before writing
    created: list[str] = field(default_factory=list)


def _target(out: str, overwrite: bool, creds: Any) -> _Target:
    path = check_out(out, overwrite)
    if _is_remote(out):
        from sft.data.creds import check_remote_out

        # No rename on object stores: the dataset is written in place and deleted again if anything fails.
        kw, replace_remote = check_remote_out(out, overwrite, creds)
        return _Target(out, path, out, True, kw, replace_remote)
    created: list[str] = []  # parent folders this call creates: removed again if the write fails (no partial output)
    parent = os.path.dirname(path)
    d = parent
    while not os.path.lexists(d) and os.path.dirname(d) != d:
        created.append(d)
        d = os.path.dirname(d)
    os.makedirs(parent, exist_ok=True)
    # A sibling (same filesystem) so the final os.rename is atomic; pid + random so concurrent writers never collide.
    return _Target(out, path, f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}", False, created=created)


class _Appender:
    """The open dataset, and a digest per column of what was appended (order-preserving, independent of the batch
    size): compared with what reads back before the dataset is renamed into place, because Deep Lake 4.7 does not
    report failed writes."""

    def __init__(self, target: _Target):
        self.target = target
        self.ds = None
        self.digests = {c: hashlib.blake2b(digest_size=16) for c in (*COLUMNS, CONVERSATION)}
        self.columns = list(COLUMNS)  # + CONVERSATION once a row has one

    def create(self) -> None:
        import deeplake

        if self.target.replace_remote:
            deeplake.delete(self.target.out, **self.target.kw)
        self.ds = deeplake.create(self.target.tmp, **self.target.kw)
        for c in COLUMNS:
            self.ds.add_column(c, deeplake.types.Text())
        # Deep Lake 4.7 writes schema changes to _deeplake_log/ from background tasks ("detached promises") that
        # outlive the Python handle: a failure right after add_column, then rmtree, raced with them and left a
        # half-deleted temp dir behind (~15% of tries). commit() waits for them; later appends showed no such race.
        self.ds.commit()

    def new_batch(self) -> dict[str, list[str]]:
        return {c: [] for c in self.digests}

    def append(self, buf: dict[str, list[str]]) -> None:
        import deeplake

        if CONVERSATION not in self.columns and any(buf[CONVERSATION]):
            # First conversation: the column is added now (earlier rows read None = no conversation), so datasets
            # without conversations keep exactly the old three-column schema.
            self.ds.add_column(CONVERSATION, deeplake.types.Text())
            self.ds.commit()
            self.columns.append(CONVERSATION)
        self.ds.append({c: buf[c] for c in self.columns})  # columnar dict of lists: one call per batch (WRITE_BATCH)
        for c in self.digests:
            self.digests[c].update(_digest_bytes(buf[c]))

    def close(self) -> dict:
        """Commit and drop the handle (before the directory moves under it); the digests of the written columns."""
        self.ds.commit()
        self.ds = None
        return {c: self.digests[c] for c in self.columns}


def _append_rows(appender: _Appender, rows: Iterable[Mapping[str, str]], validate: bool, batch_size: int,
                 bar) -> int:
    """Append ``rows`` in batches of ``batch_size``; the number of rows."""
    n = 0
    buf = appender.new_batch()
    for row in rows:
        n += 1
        if validate:
            _check_row(row, n)
        for c in COLUMNS:
            buf[c].append(row[c])
        buf[CONVERSATION].append(row.get(CONVERSATION) or "")
        if len(buf["question"]) >= batch_size:
            appender.append(buf)
            bar.update(len(buf["question"]))
            buf = appender.new_batch()
    if buf["question"]:
        appender.append(buf)
        bar.update(len(buf["question"]))
    return n


def _failure(e: BaseException, target: _Target) -> BaseException | None:
    """Remove what the failed write made; the error to raise instead of ``e``, or None to re-raise ``e``."""
    out, storage = target.out, isinstance(e, Exception) and not isinstance(e, IngestError) and _is_storage_error(e)
    if target.remote:
        _delete_remote(out, target.kw)
        if storage:
            return IngestError(f"--out {out}: writing the dataset failed: {type(e).__name__}: "
                               f"{(str(e).splitlines() or [''])[0]}. Nothing was left at {out}")
        return None
    err = None
    if storage:
        # a write (or the commit) failed outright: name the cause while the temp dir still shows it
        err = _write_failed(out, target.path, target.tmp, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
    _remove_tree(target.tmp)
    _remove_empty(target.created)
    return err


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
    target = _target(out, overwrite, creds)

    import deeplake  # noqa: F401  (the writer's steps use it: imported before anything is written)
    from tqdm.auto import tqdm

    appender = _Appender(target)
    try:
        appender.create()
        with _FirstRowBar(tqdm, total=total, unit=" rows", desc=f"writing {os.path.basename(target.path)}",
                          disable=not progress, dynamic_ncols=True) as bar:
            n = _append_rows(appender, rows, validate, batch_size, bar)
        if n == 0:
            raise IngestError(f"no rows to write to {out}: the input is empty")
        problem = _verify(target.tmp, n, appender.close(), batch_size, target.kw)
        if problem is not None:
            raise _write_failed(out, target.path, target.tmp, f"the dataset does not read back as written ({problem})")
        if not target.remote:
            _replace(target.tmp, target.path)
    except BaseException as e:
        appender.ds = None
        err = _failure(e, target)
        if err is None:
            raise
        raise err from e
    if not target.remote and os.path.exists(target.tmp):  # a late background write re-created the temp path
        _remove_tree(target.tmp)
    return n


class _FirstRowBar:
    """A progress bar that appears with the first rows written: an ingest that fails before writing any (a wrong
    --map, every row bad) prints its error without a "writing ...: 0 rows" bar above it."""

    def __init__(self, factory, **kw):
        self.factory, self.kw, self.bar = factory, kw, None

    def update(self, n: int) -> None:
        if self.bar is None:
            self.bar = self.factory(**self.kw)
        self.bar.update(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


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
