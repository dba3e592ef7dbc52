"""Atomic writes: the one helper for every file and folder sft writes that a crash must not leave half-written.

A file is written as a temporary sibling and renamed over its final name (``os.replace`` is atomic on POSIX
within one filesystem); a folder is built as a temporary sibling and renamed into place. A reader therefore sees
the old content or the new, never a part, and a failure removes the temporary and re-raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_file(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; once the block has written it, it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str, fsync: bool = False) -> None:
    with atomic_file(path, fsync=fsync) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any, indent: int = 1, fsync: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str), fsync=fsync)


@contextlib.contextmanager
def atomic_dir(final: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; once the block has filled it, it becomes ``final``
    (an existing ``final`` is removed first when ``replace``; otherwise the one already there is kept, e.g. a
    cache entry another process wrote meanwhile). On failure the temporary folder is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=final.name + ".tmp-"))
    try:
        yield tmp
        if final.exists() and replace:
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if replace or not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
