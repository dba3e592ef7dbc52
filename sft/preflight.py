"""Checks that run before any heavy work, and the diagnosis of failed writes.

``unwritable_reason(path)``
    Why a directory cannot be created or written at ``path`` (or None). It creates and removes a probe directory
    in the nearest existing ancestor instead of reading permission bits, so it is right for root too (root ignores
    ``chmod 0o555`` but not a read-only mount, sysfs or a file standing where a folder should be).
``check_output_dir(cfg)``
    The ``training.output_dir`` problem of a run, as a list for ``train()``'s problem collection (checked before
    the model loads).
``is_disk_full(exc)`` / ``write_failure_reason(path)``
    Recognise "no space left" / "file too large" / "over quota" in an exception chain (Python ``OSError`` or the
    text of a native library's error), and say which of them it probably was: a finite ``ulimit -f``, a full disk,
    or neither that can be seen from here.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: errno values that mean "the storage is full" in one of its forms.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
#: The same, as native libraries (Rust's io::Error, C++'s strerror) spell them in their messages.
_DISK_FULL_TEXT = ("no space left on device", "file too large", "disk quota exceeded",
                   *(f"os error {n}" for n in sorted(DISK_FULL_ERRNOS)))
#: Free space below which a failed write is blamed on a full disk.
FULL_DISK_BYTES = 64 * 2**20


def _nearest_existing(path: str) -> str:
    p = os.path.abspath(os.path.expanduser(path))
    while not os.path.lexists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return p


def unwritable_reason(path: str | os.PathLike) -> str | None:
    """Why a directory cannot be created at (or written into) ``path``; None when it can.

    Leaves nothing behind: the probe directory is removed, and ``path`` itself is not created."""
    p = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.lexists(p) and not os.path.isdir(p):
        return f"{p} exists and is not a directory"
    base = _nearest_existing(p)
    if not os.path.isdir(base):
        return f"{base} is a file, not a directory, so nothing can be created below it"
    try:
        probe = tempfile.mkdtemp(dir=base, prefix=".sft-write-probe-")
    except OSError as e:
        return f"{base} is not writable ({e.strerror or e})"
    try:
        os.rmdir(probe)
    except OSError:
        pass
    return None


#: What a run leaves in output_dir (besides data/ and logs/), newest-first evidence of an earlier run.
RUN_OUTPUTS = ("summary.json", "adapter", "merged", "checkpoints")


def earlier_run(out: str | Path) -> list[str]:
    """The outputs of an earlier run that ``out`` holds (names from :data:`RUN_OUTPUTS`; empty: none)."""
    p = Path(out)
    found = []
    for name in RUN_OUTPUTS:
        q = p / name
        if q.is_file() or (q.is_dir() and any(q.iterdir())):
            found.append(name)
    return found


def check_output_dir(cfg) -> list[str]:
    """Problems with ``training.output_dir`` (empty when it can be written and holds no earlier run that this one
    would silently replace), for ``train()``'s preflight."""
    out = cfg.training.output_dir
    reason = unwritable_reason(out)
    if reason is not None:
        return [f"training.output_dir: cannot write to {out}: {reason}. Choose a writable directory: "
                f"training.output_dir=PATH"]
    t = cfg.training
    found = [] if t.resume or t.overwrite else earlier_run(out)
    if found:
        what = "a finished run" if "summary.json" in found or "adapter" in found else "an unfinished run"
        return [f"training.output_dir: {out} holds {what} ({', '.join(found)}); this run would replace it. "
                f"Continue it with training.resume=auto, replace it with training.overwrite=true, or choose "
                f"another training.output_dir"]
    return []


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException | None) -> bool:
    """True when ``exc`` (or what caused it) says the disk is full, a file-size limit or a quota was hit."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        text = str(e).lower()
        if any(t in text for t in _DISK_FULL_TEXT):
            return True
    return False


def file_size_limit() -> int | None:
    """The soft ``RLIMIT_FSIZE`` (``ulimit -f``) in bytes, or None when unlimited (or unknown)."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def write_failure_reason(path: str | os.PathLike, written: str | os.PathLike | None = None) -> str:
    """The likely cause of a failed (or silently short) write below ``path``, in words.

    ``written``: a file or directory that was being written; a file in it at the size limit pins the blame."""
    limit = file_size_limit()
    if limit is not None:
        at_limit = False
        if written is not None and os.path.exists(written):
            sizes = [os.path.getsize(written)] if os.path.isfile(written) else [
                os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(written) for f in fs]
            at_limit = any(s >= limit for s in sizes)
        if at_limit or written is None:
            return f"a file reached the file-size limit (ulimit -f) of {limit} bytes"
    base = _nearest_existing(os.fspath(path))
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        free = None
    if free is not None and free < FULL_DISK_BYTES:
        return f"the disk holding {base} is full ({free / 2**20:.1f} MiB free)"
    if limit is not None:
        return f"the disk may be full, or a file reached the file-size limit (ulimit -f) of {limit} bytes"
    return "the disk may be full, over quota or failing"
