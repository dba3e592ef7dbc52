"""Token lengths of a dataset's rows: the counting pass, its cache, and exact block counts for any rank and epoch.

Why lengths and not block counts. Packing concatenates documents into one stream, so the blocks one finite pass
yields are ``sum(stream lengths) // seq_length``, whatever the order. With the rows' token lengths (one int32 per
row, formatted exactly as training formats them) the block count of *any* rank's share of *any* epoch's permutation
is one vectorised sum, for any ``seq_length`` and overlong policy, with no second pass over the data.

The counting pass runs once per (dataset version, tokenizer, template, answer_only): every rank tokenizes its
contiguous ``shard_range`` (so the ranks share the work), the pieces are gathered, and the result is cached as an
``.npy`` under ``data.length_cache`` (default ``~/.cache/sft/lengths``). A second run with the same key starts at
once. The cache is kept beside the user's other caches rather than inside the dataset: datasets are often
read-only, shared, or in a bucket. The key includes the dataset's Deep Lake id (new for every created dataset),
version (commit) and row count, so a re-ingested or appended dataset never meets a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import numpy as np

from sft.data.packing import PackingStats, check_packing_args, check_and_report
from sft.io import atomic_file

log = logging.getLogger(__name__)

#: Bumped when the way lengths are computed changes (invalidates every cached entry).
_FORMAT = 1


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything in ``tokenizer`` that decides token ids: its vocabulary and rules (the fast
    tokenizer's serialised state), special tokens and chat template."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: the vocabulary stands for its rules
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([str(getattr(tokenizer, "chat_template", None)), tokenizer.eos_token, tokenizer.bos_token,
                         getattr(tokenizer, "add_bos_token", None)]).encode())
    return h.hexdigest()[:24]


def dataset_identity(path: str, ds) -> dict:
    """What names one version of a dataset: where it is, its Deep Lake id, version and row count.

    The version alone is not enough: Deep Lake 4.7 numbers commits the same way in every dataset
    (``0000000001c00000000`` is the first commit of any of them), so a dataset re-created at the same path with the
    same number of commits has the same version. ``ds.id`` is drawn afresh when a dataset is created."""
    from sft.data.source import local_path, is_remote

    return {"path": path if is_remote(path) else local_path(path), "id": str(getattr(ds, "id", "")),
            "version": str(getattr(ds, "version", "")), "rows": len(ds)}


def cache_key(identity: dict, tokenizer, template: str, answer_only: bool) -> str:
    blob = json.dumps({"format": _FORMAT, "data": identity, "tokenizer": tokenizer_fingerprint(tokenizer),
                       "template": template, "answer_only": bool(answer_only)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _cache_file(cache_dir: str | None, key: str) -> str | None:
    if not cache_dir:
        return None
    return os.path.join(os.path.expanduser(cache_dir), f"{key}.npy")


def load_cached(cache_dir: str | None, key: str, rows: int) -> np.ndarray | None:
    """The cached lengths for ``key``, or None (no cache, no entry, or an entry of the wrong size)."""
    f = _cache_file(cache_dir, key)
    if f is None or not os.path.isfile(f):
        return None
    try:
        lengths = np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
        log.warning("data.length_cache: ignoring unreadable %s (%s); counting again", f, e)
        return None
    if lengths.shape != (rows,):
        log.warning("data.length_cache: ignoring %s (%s entries for %d rows); counting again", f, lengths.shape, rows)
        return None
    return lengths


def save_cached(cache_dir: str | None, key: str, lengths: np.ndarray) -> None:
    """Write the entry atomically (a temporary file renamed into place: concurrent writers are harmless)."""
    f = _cache_file(cache_dir, key)
    if f is None:
        return
    try:
        with atomic_file(f) as tmp, open(tmp, "wb") as fh:
            np.save(fh, lengths.astype(np.int32, copy=False), allow_pickle=False)
    except OSError as e:  # a cache that cannot be written costs a recount next time, never the run
        log.warning("data.length_cache: could not write %s (%s); the next run counts again", f, e)


def count_lengths(rows, formatter, total: int, progress: bool = False, desc: str = "counting tokens",
                  batch_rows: int = 512) -> np.ndarray:
    """Token lengths (``len(input_ids)``, before EOS and the overlong policy) of ``rows``, in order."""
    from itertools import islice

    from tqdm.auto import tqdm

    out = np.empty(total, dtype=np.int32)
    it, n = iter(rows), 0
    with tqdm(total=total, desc=desc, unit="row", disable=not progress, leave=False) as bar:
        while batch := list(islice(it, batch_rows)):
            ids = formatter.rows(batch)
            out[n:n + len(ids)] = [len(i) for i, _ in ids]
            n += len(ids)
            bar.update(len(ids))
    if n != total:
        raise RuntimeError(f"counted {n} rows, expected {total}")
    return out


def stream_stats(lengths: np.ndarray, seq_length: int, overlong: str) -> PackingStats:
    """What one finite packing pass over rows of these token lengths yields (the packer's own accounting,
    vectorised: tests/test_packing.py checks it against :class:`sft.data.packing.PackedDataset`)."""
    n = lengths.astype(np.int64) + 1  # the EOS
    long = n > seq_length
    if overlong == "split":
        stream = n
    elif overlong == "truncate":
        stream = np.where(long, seq_length, n)
    else:
        stream = np.where(long, 0, n)
    s = PackingStats()
    s.overlong = int(long.sum())
    s.truncated = s.overlong if overlong == "truncate" else 0
    s.skipped = s.overlong if overlong == "skip" else 0
    s.documents = len(lengths) - s.skipped
    s.tokens = int(stream.sum())
    s.blocks, s.dropped_tail_tokens = divmod(s.tokens, seq_length)
    return s


def count_blocks(rows, tokenizer, template: str = "default", seq_length: int = 512, answer_only: bool = False,
                 overlong: str = "split") -> PackingStats:
    """What one finite pass of :class:`~sft.data.packing.PackedDataset` over ``rows`` yields, without building
    blocks: the rows' token lengths (formatted exactly as training formats them), then :func:`stream_stats`.
    Reports overlong samples like the packer does."""
    from sft.data.formatting import Formatter

    check_packing_args(seq_length, overlong)
    rows = list(rows)
    stats = stream_stats(count_lengths(rows, Formatter(tokenizer, template, answer_only), len(rows)), seq_length,
                         overlong)
    check_and_report(stats, seq_length, overlong)
    return stats


@dataclass
class Counted:
    lengths: np.ndarray  # every row of the dataset, in dataset order
    cached: bool  # True when read from the cache (no counting pass ran)


def _key(source, tokenizer, template: str, answer_only: bool) -> str:
    return cache_key(dataset_identity(source.path, source.dataset()), tokenizer, template, answer_only)


def _cached(source, key: str, cache_dir: str | None) -> Counted | None:
    from sft import distributed as dist

    cached = load_cached(cache_dir, key, source.total_rows)
    # every rank must take the same branch (one rank's cache may be on a node-local disk the others lack)
    return Counted(cached, True) if dist.all_reduce_min_int(0 if cached is None else 1) == 1 else None


def cached_lengths(source, tokenizer, template: str, answer_only: bool, cache_dir: str | None) -> Counted | None:
    """The cached lengths of every row of ``source``'s dataset if every rank has them, else None (no counting).

    Collective when several ranks run: call it on every rank with the same arguments.
    """
    return _cached(source, _key(source, tokenizer, template, answer_only), cache_dir)


def dataset_lengths(source, tokenizer, template: str, answer_only: bool, cache_dir: str | None,
                    progress: bool = False) -> Counted:
    """Lengths of every row of ``source``'s dataset, from the cache or from a counting pass shared by the ranks.

    Collective when several ranks run: call it on every rank with the same arguments.
    """
    from sft import distributed as dist
    from sft.data.formatting import Formatter
    from sft.data.source import shard_range

    key = _key(source, tokenizer, template, answer_only)
    hit = _cached(source, key, cache_dir)
    if hit is not None:
        return hit
    total = source.total_rows
    info = dist.dist_info()
    part = source.contiguous_share(info.rank, info.world_size)
    lo, hi = shard_range(total, info.rank, info.world_size)
    mine = count_lengths(part.iter_rows(0), Formatter(tokenizer, template, answer_only), hi - lo,
                         progress=progress and dist.is_main_process(),
                         desc=f"counting tokens ({hi - lo:,} rows per rank)")
    lengths = dist.all_gather_concat(mine)
    if info.local_rank == 0:
        save_cached(cache_dir, key, lengths)
    return Counted(lengths, False)
