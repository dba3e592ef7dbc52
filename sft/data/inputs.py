"""The run's data: its Deep Lake sources, opened and checked before anything loads, and a library caller's own rows
(``sft.train(cfg, dataset=rows)``), written once to a Deep Lake dataset so that they take the same path (shards,
length cache, exact resume) as any other."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from sft import distributed as dist
from sft.config import RunConfig
from sft.data.source import ShardedSource
from sft.errors import DataError


@dataclass
class RunData:
    train: ShardedSource
    eval: ShardedSource | None


def source(cfg: RunConfig, path: str, shuffle: bool, rank: int = 0, world: int = 1) -> ShardedSource:
    """A rank's share of ``path`` with the run's order and remote-read settings (data.creds, timeouts)."""
    return ShardedSource(path, rank=rank, world_size=world, seed=cfg.training.seed, shuffle=shuffle,
                         read_batch=cfg.data.read_batch, creds=cfg.data.creds, read_timeout_s=cfg.data.read_timeout_s,
                         read_attempts=cfg.data.read_attempts)


def open_data(cfg: RunConfig, rank: int, world: int) -> RunData:
    """This rank's train (and eval) source; raises :class:`DataError` naming the problem."""
    if not cfg.data.path:
        raise DataError("data.path is not set: pass a Deep Lake dataset (make one with `sft ingest FILE --out PATH`)")
    train = source(cfg, cfg.data.path, cfg.data.shuffle, rank, world)
    ev = source(cfg, cfg.data.eval_path, False, rank, world) if cfg.data.eval_path else None
    return RunData(train=train, eval=ev)


def rows_dataset(cfg: RunConfig, rows: Iterable[dict]) -> RunConfig:
    """``cfg`` with data.path pointing at ``rows`` written as a Deep Lake dataset (rank 0 writes, every rank waits)
    under training.output_dir/data/train; rows need ``question`` and ``answer`` (``source`` defaults to sft.train)."""
    from sft.data.ingest import write_dataset

    path = Path(cfg.training.output_dir) / "data" / "train"
    if dist.is_main_process():
        rows = [{"source": "sft.train"} | dict(r) if isinstance(r, dict) else r for r in rows]  # source is optional
        write_dataset(str(path), rows, progress=cfg.training.progress, overwrite=True)
    dist.barrier()
    return replace(cfg, data=replace(cfg.data, path=str(path)))


def first_rows(cfg: RunConfig, path: str, n: int) -> list[dict[str, str]]:
    """The first ``n`` rows of ``path`` in dataset order (held-out rows for an evaluation)."""
    rows = []
    for row in source(cfg, path, shuffle=False).iter_rows(0):
        rows.append(row)
        if len(rows) >= n:
            break
    return rows
