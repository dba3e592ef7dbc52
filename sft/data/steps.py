"""How many optimizer steps an epoch is, and whether evaluation has data: decided before the model loads.

``plan_steps`` is what training calls. Three cases:

* the row lengths are cached for this dataset version, tokenizer and formatting: everything below is computed
  from them at once (no pass over the data);
* ``training.max_steps`` is set and no interval is counted in epochs: there is nothing to count, so the run starts
  at once; a probe packs the first block (which the first step needs anyway) so that data the overlong policy
  empties fails now, and overlong samples are reported as training meets them;
* otherwise one counting pass, shared by the ranks, measures every row's token length and caches it.

With the lengths, the blocks of every rank's share of epoch 0's permutation are exact sums, so every rank knows the
smallest share (every rank takes that many steps per epoch) without another collective.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from sft.data.lengths import cached_lengths, dataset_lengths, stream_stats
from sft.data.packing import all_skipped_error, check_and_report
from sft.data.source import epoch_permutation, shard_range

log = logging.getLogger(__name__)


@dataclass
class StepPlan:
    steps_per_epoch: int | None  # None when not counted (max_steps set)
    counting: str  # "counted", "cached" or "skipped"
    has_eval: bool  # some rank's eval share packs into at least one block (every rank joins every evaluation)


def length_cache_dir(setting: str | None) -> str | None:
    """``data.length_cache``: ``auto`` is ``$SFT_CACHE_DIR/lengths`` (default ``~/.cache/sft/lengths``)."""
    if setting in (None, "", "none"):
        return None
    if setting == "auto":
        root = os.environ.get("SFT_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sft")
        return os.path.join(root, "lengths")
    return os.path.expanduser(setting)


def rank_shares(total: int, world: int, shuffle: bool, seed: int, epoch: int = 0) -> list[np.ndarray]:
    """The dataset rows each rank reads in ``epoch`` (what :class:`ShardedSource` streams), from one permutation."""
    order = epoch_permutation(total, seed, epoch) if shuffle else np.arange(total)
    return [order[slice(*shard_range(total, r, world))] for r in range(world)]


def _probe(cfg, tokenizer, source) -> None:
    """Pack the first block of this rank's stream: raises the overlong policy's error if it leaves nothing."""
    from sft.data.packing import PackedDataset

    probe = PackedDataset.for_source(cfg.data, tokenizer, source, infinite=False)
    next(iter(probe), None)  # a finite pass stops after one epoch: an epoch with fewer tokens than a block is fine


def plan_steps(cfg, tokenizer, train_src, eval_src, per_step: int, world: int) -> StepPlan:
    from sft import distributed as dist

    L, overlong = cfg.data.seq_length, cfg.data.overlong
    cache = length_cache_dir(cfg.data.length_cache)
    progress = cfg.training.progress
    epochs_counted = "epoch" in (cfg.training.save_strategy,
                                 cfg.training.eval_strategy if eval_src is not None else "no")
    if cfg.training.max_steps > 0 and not epochs_counted:
        counted = cached_lengths(train_src, tokenizer, cfg.data.template, cfg.data.answer_only, cache)
    else:
        counted = dataset_lengths(train_src, tokenizer, cfg.data.template, cfg.data.answer_only, cache, progress)

    steps_per_epoch = None
    if counted is None:
        _probe(cfg, tokenizer, train_src)
        counting = "skipped"
        if dist.is_main_process():
            print("data: the counting pass is skipped (training.max_steps is set); overlong samples are reported "
                  "as training meets them")
    else:
        counting = "cached" if counted.cached else "counted"
        whole = stream_stats(counted.lengths, L, overlong)  # the whole dataset, on every rank
        if dist.is_main_process():
            check_and_report(whole, L, overlong)
        elif whole.skipped and not whole.documents:
            raise all_skipped_error(whole.skipped, L)
        blocks = [stream_stats(counted.lengths[rows], L, overlong).blocks
                  for rows in rank_shares(train_src.total_rows, world, cfg.data.shuffle, cfg.training.seed)]
        steps_per_epoch = min(blocks) // per_step
        if dist.is_main_process():
            how = "from the length cache" if counted.cached else "counted"
            print(f"data: {train_src.total_rows:,} rows, {min(blocks):,}-{max(blocks):,} blocks of {L} tokens per "
                  f"rank in epoch 0 ({how}): {steps_per_epoch} steps per epoch")

    has_eval = False
    if eval_src is not None and cfg.training.eval_strategy != "no":
        ev = dataset_lengths(eval_src, tokenizer, cfg.data.template, cfg.data.answer_only, cache, progress)
        has_eval = any(stream_stats(ev.lengths[rows], L, overlong).blocks >= 1
                       for rows in rank_shares(eval_src.total_rows, world, False, 0))
    return StepPlan(steps_per_epoch=steps_per_epoch, counting=counting, has_eval=has_eval)
