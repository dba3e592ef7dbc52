"""Object-store credentials (``data.creds``, ``sft ingest --creds``) and bounded remote calls.

``resolve(creds)``
    ``data.creds`` -> the ``creds`` mapping Deep Lake takes, or None. ``creds`` is a mapping (YAML), a path to a
    JSON file holding one, or None: then the standard AWS environment variables (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
    ``AWS_REGION`` / ``AWS_DEFAULT_REGION``), or None when none is set (Deep Lake's own default chain).
    Keys: ``aws_access_key_id``, ``aws_secret_access_key``, ``aws_session_token``, ``endpoint_url``,
    ``aws_region``.
``redact(value)``
    What may be written anywhere (logs, ``summary.json``, checkpoints): the key names and the endpoint, never a
    key id, a secret or a token. Error messages in this module name keys, never values.
``bounded(fn, url, ...)``
    Runs one remote call with a deadline and a bounded number of attempts. Deep Lake 4.7 retries an unreachable
    ``s3://`` endpoint for ~40-70 s per call before it raises (and a missing bucket for ~30 s), so a store that
    goes away mid-run would otherwise stall every read for a minute, over and over. Each attempt runs in a daemon
    thread (a stuck native call cannot be interrupted, only abandoned); after ``attempts`` failed or timed-out
    tries a :class:`DataError` names the URL and the bound.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sft.config.secrets import redact  # noqa: F401 (the rule lives below sft.data: sft.config redacts too)
from sft.errors import DataError

KEYS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "endpoint_url", "aws_region")
_ENV = (
    ("aws_access_key_id", ("AWS_ACCESS_KEY_ID",)),
    ("aws_secret_access_key", ("AWS_SECRET_ACCESS_KEY",)),
    ("aws_session_token", ("AWS_SESSION_TOKEN",)),
    ("endpoint_url", ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")),
    ("aws_region", ("AWS_REGION", "AWS_DEFAULT_REGION")),
)

#: Remote calls given up on while still running (see :func:`bounded`). Deep Lake crashes the interpreter's
#: shutdown (SIGSEGV, measured) when one of its calls is still in flight, so the CLI ends such a process with
#: ``os._exit`` after printing its error (:func:`sft.cli.main`).
_abandoned = 0

T = TypeVar("T")


def _check(creds: Any, where: str) -> dict[str, str]:
    if not isinstance(creds, Mapping):
        raise DataError(f"{where}: expected a mapping of {', '.join(KEYS)} (or a JSON file holding one), "
                        f"got a {type(creds).__name__}")
    out = {}
    for k, v in creds.items():
        if k not in KEYS:
            raise DataError(f"{where}: unknown key {k!r}; the keys are {', '.join(KEYS)}")
        if not isinstance(v, str) or not v:
            raise DataError(f"{where}: {k} must be a non-empty string")  # never echo the value: it may be a secret
        out[k] = v
    if ("aws_access_key_id" in out) != ("aws_secret_access_key" in out):
        raise DataError(f"{where}: give aws_access_key_id and aws_secret_access_key together")
    return out


def resolve(creds: str | Mapping[str, str] | None, where: str = "data.creds") -> dict[str, str] | None:
    """``data.creds`` (mapping, JSON file path, or None for the AWS environment variables) -> Deep Lake creds."""
    if creds is None:
        found = {}
        for key, names in _ENV:
            for name in names:
                if os.environ.get(name):
                    found[key] = os.environ[name]
                    break
        return _check(found, "AWS_* environment variables") if found else None
    if isinstance(creds, str):
        path = Path(creds).expanduser()
        try:
            text = path.read_text()
        except OSError as e:
            raise DataError(f"{where}: cannot read the credentials file {creds} ({e.strerror or e}); give a JSON "
                            f"file with {', '.join(KEYS)}, or a mapping in the train YAML") from None
        try:
            data = json.loads(text)
        except ValueError:
            raise DataError(f"{where}: {creds} is not valid JSON; it must hold one object with "
                            f"{', '.join(KEYS)}") from None
        return _check(data, f"{where} ({creds})")
    return _check(creds, where)


def abandoned_calls() -> int:
    """How many remote calls this process gave up on while they were still running."""
    return _abandoned


def is_access_error(e: BaseException) -> bool:
    """A refusal by the store (wrong key, no permission): retrying cannot help."""
    name = type(e).__name__
    return any(w in name for w in ("AccessDenied", "Authentication", "Authorization", "PermissionDenied"))


def is_transient(e: BaseException) -> bool:
    """A failure to reach the store (worth another try), not a refusal or bad input."""
    name = type(e).__name__
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        w in name for w in ("Network", "Connection", "Timeout", "Unavailable"))


def bounded(fn: Callable[[], T], url: str, what: str, timeout_s: float, attempts: int,
            backoff_s: float = 1.0) -> T:
    """``fn()``, tried at most ``attempts`` times, each given ``timeout_s``; else a DataError naming ``url``.

    Only timeouts and failures to reach the store (:func:`is_transient`) are retried; anything else (a refusal,
    bad data) propagates at once, unchanged. Worst case:
    ``attempts * timeout_s + backoff_s * (attempts - 1) * attempts / 2`` seconds.
    """
    last = "no attempt"
    start = time.monotonic()
    for attempt in range(1, attempts + 1):
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # handed to the caller's thread
                box["error"] = e

        t = threading.Thread(target=run, name=f"sft-remote-{what}", daemon=True)
        t.start()
        t.join(timeout_s)
        if t.is_alive():
            global _abandoned
            _abandoned += 1
            last = f"no answer within {timeout_s:g} s"
        elif "error" in box:
            e = box["error"]
            if not is_transient(e):
                raise e
            last = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        else:
            return box["value"]
        if attempt < attempts:
            time.sleep(backoff_s * attempt)
    raise DataError(
        f"dataset {url}: {what} failed {attempts} time(s) in {time.monotonic() - start:.0f} s (last: {last}); the "
        f"object store is unreachable or refusing. Check the endpoint and the network; after a crash, resume from "
        f"the last complete checkpoint with training.resume=auto (data.read_timeout_s and data.read_attempts bound "
        f"this wait)"
    )


def remote_kwargs(path: str, creds: Any, timeout_s: float, attempts: int) -> dict[str, Any]:
    """Before opening a remote dataset for reading: the deeplake keyword args (``creds``), after asking
    ``deeplake.exists`` for s3:// paths, which answers a wrong key or a missing bucket in milliseconds (opening
    retries a missing bucket for ~30 s). Only s3:// (measured): ``exists`` also says False for az:// without
    credentials and hub:// offline, where opening names the real cause."""
    import deeplake

    resolved = resolve(creds)
    kw = {"creds": resolved} if resolved else {}

    def probe() -> bool:
        try:
            return deeplake.exists(path, **kw)
        except Exception as e:
            if is_access_error(e):
                raise DataError(
                    f"cannot open remote dataset {path}: access denied ({type(e).__name__}). Check data.creds (or "
                    f"the AWS_* environment variables): the key id, the secret and the bucket's permissions"
                ) from None
            raise

    if path.lower().startswith("s3://") and not bounded(probe, path, "checking that it exists", timeout_s, attempts):
        raise DataError(
            f"no Deep Lake dataset at {path}: the bucket or the prefix does not exist. Check the URL (and "
            f"data.creds' endpoint_url), or create it with `sft ingest FILE --out {path}`."
        )
    return kw


def check_remote_out(out: str, overwrite: bool, creds: Any, timeout_s: float = 60.0, attempts: int = 2
                     ) -> tuple[dict[str, Any], bool]:
    """Before an ingest to object storage: ``(deeplake keyword args, whether out exists)``.

    A wrong key fails here, in milliseconds, before any input is read; an existing dataset needs ``overwrite``.
    Object stores have no atomic rename, so the dataset is written in place and deleted again if the write fails
    (sft.data.ingest.write_dataset); ``--overwrite`` deletes the old one just before writing the new one.
    """
    import deeplake

    from sft.errors import IngestError

    resolved = resolve(creds, "--creds")
    kw = {"creds": resolved} if resolved else {}

    def probe() -> bool:
        try:
            return deeplake.exists(out, **kw)
        except Exception as e:
            if is_access_error(e):
                raise IngestError(f"--out {out}: access denied ({type(e).__name__}); check --creds (or the AWS_* "
                                  f"environment variables): the key id, the secret and the bucket's "
                                  f"permissions") from None
            raise

    exists = bounded(probe, out, "checking the output", timeout_s, attempts)
    if exists and not overwrite:
        raise IngestError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    return kw, exists
