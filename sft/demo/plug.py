"""How the demo plugs into a run: its data written where the config points (:func:`prepare_data`), and its
evaluation as run hooks (:func:`hooks`)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from sft import distributed as dist
from sft.config import RunConfig
from sft.demo.evaluation import ExactMatch
from sft.demo.task import generate_examples


def prepare_data(cfg: RunConfig, users: Collection[str] = ()) -> None:
    """Generate the demo task into data.path / data.eval_path where they do not exist (rank 0; others wait).

    ``users``: the fields among ``data.path`` / ``data.eval_path`` that name the user's own dataset (``sft train``
    passes those given on its command line without ``demo.generate``); a missing one is left missing, so that the
    run stops with the missing-dataset error instead of writing the demo task there (an object store bucket, or a
    mistyped path) and training on it."""
    import sys

    import torch

    from sft.data.ingest import write_dataset

    # the ranks wait for rank 0's files below: the process group must exist first (train() then reuses it)
    dist.init_process_group_if_needed(timeout_s=cfg.training.dist_timeout_s,
                                      device="cuda" if torch.cuda.is_available() else "cpu")
    if dist.is_main_process():
        fields = (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path))
        # a missing local dataset of the user's: the run stops at the missing-dataset error, and nothing (not the
        # demo's other split either) may be written before it
        user_missing = any(f in users and p and "://" not in p and not Path(p).exists() for f, p in fields)
        for field, path, split, n in (("data.path", cfg.data.path, "train", cfg.demo.train_rows),
                                      ("data.eval_path", cfg.data.eval_path, "test", cfg.demo.test_rows)):
            if not path or Path(path).exists():
                continue
            if field in users:
                print(f"demo: {field}={path} was given on the command line, so it is read as your dataset and "
                      f"the demo task is not generated there (add demo.generate=true to generate it there)",
                      file=sys.stderr)
            elif not user_missing:
                rows = generate_examples(n, seed=cfg.training.seed, split=split)
                write_dataset(path, rows, progress=cfg.training.progress)
                print(f"demo: wrote {n} {split} rows to {path}")
    dist.barrier()


def hooks(cfg: RunConfig) -> list:
    """The run hooks the config asks for: exact-match accuracy when demo.accuracy_samples and data.eval_path are
    set."""
    return [ExactMatch(cfg)] if cfg.demo.accuracy_samples and cfg.data.eval_path else []
