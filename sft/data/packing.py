"""Token stream -> constant-length training blocks.

This reproduces the seed's TRL ``ConstantLengthDataset`` (removed from TRL in 0.20) and adds document boundaries:

* every sample ``(input_ids, labels)`` is followed by exactly one EOS, which is always a label (also in answer-only
  mode: the model must learn to stop);
* the stream is cut into blocks of exactly ``seq_length`` tokens; a sample may span two (or more) blocks and the
  remainder carries over; at the end of a finite stream the incomplete last block is dropped and counted;
* ``position_ids`` restart at 0 at every document start and at the start of every block (a document continued from
  the previous block starts again at 0 there), so Llama-style models can isolate documents
  (``position_ids`` drive FlashAttention varlen / per-document masks in later work).

Labels are *unshifted* (Hugging Face models shift them internally), as in ``ConstantLengthDataset``.

Layers, from pure to stateful:

``Packer``
    The one stateful packing core (a token buffer). ``add()`` a sample, ``pop_block()`` while one is ready.
``pack_examples()``
    Pure generator over an iterable of ``(input_ids, labels)``.
``PackedDataset``
    ``torch.utils.data.IterableDataset`` over rows ``{"question", "answer"}`` from ``rows_fn(epoch, start)``, with a
    resumable cursor.

Counting blocks without building them (steps per epoch) is sft.data.lengths: the rows' token lengths, then the
same accounting vectorised (``stream_stats``, ``count_blocks``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from sft.data.formatting import Formatter
from sft.errors import ConfigError, DataError

log = logging.getLogger(__name__)

OVERLONG_POLICIES = ("split", "truncate", "skip")


@dataclass
class PackingStats:
    """Counts of one packing pass.

    ``tokens`` counts stream tokens, i.e. after the overlong policy and including one EOS per document, so that
    ``tokens == blocks * seq_length + dropped_tail_tokens`` at the end of a finite stream. A sample is *overlong*
    when it does not fit one block together with its EOS (``len(input_ids) >= seq_length``); ``overlong`` counts
    them whatever the policy, ``truncated`` / ``skipped`` count what the policy did (``documents`` excludes skipped).
    """

    documents: int = 0
    tokens: int = 0
    blocks: int = 0
    dropped_tail_tokens: int = 0
    overlong: int = 0
    truncated: int = 0
    skipped: int = 0

def check_packing_args(seq_length: int, overlong: str) -> None:
    if not isinstance(seq_length, int) or seq_length < 2:
        raise ConfigError(f"data.seq_length must be an integer >= 2, got {seq_length!r}")
    if overlong not in OVERLONG_POLICIES:
        raise ConfigError(f"data.overlong: unknown policy {overlong!r}; use one of {', '.join(OVERLONG_POLICIES)}")


def _stream_length(n_ids: int, seq_length: int, overlong: str) -> int:
    """Tokens a sample of ``n_ids`` tokens puts into the stream (EOS included; 0 when skipped)."""
    n = n_ids + 1
    if n <= seq_length or overlong == "split":
        return n
    return seq_length if overlong == "truncate" else 0


class Packer:
    """The packing core: a token buffer that turns samples into constant-length blocks.

    ``add(ids, labels)`` appends a sample and its EOS (after the overlong policy) and returns the number of stream
    tokens it added; ``pop_block()`` returns the next full block or ``None``. ``finish()`` drops the incomplete tail
    (counted in ``stats.dropped_tail_tokens``). ``discard(n)`` drops ``n`` tokens from the front of the buffer
    without emitting them and uncounts them from ``stats.tokens`` (used to resume inside a document).
    """

    def __init__(self, seq_length: int, eos_token_id: int, overlong: str = "split", stats: PackingStats | None = None):
        check_packing_args(seq_length, overlong)
        if eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token; packing needs one to end every sample")
        self.seq_length = seq_length
        self.eos_token_id = int(eos_token_id)
        self.overlong = overlong
        self.stats = stats if stats is not None else PackingStats()
        self._ids: list[int] = []
        self._labels: list[int] = []
        self._pos: list[int] = []  # position of each token inside its document
        self._start = 0  # read offset into the buffer lists (compacted lazily)

    @property
    def buffered(self) -> int:
        """Tokens waiting in the buffer (not yet emitted)."""
        return len(self._ids) - self._start

    def add(self, input_ids: list[int], labels: list[int]) -> int:
        if len(input_ids) != len(labels):
            raise ValueError(f"input_ids ({len(input_ids)}) and labels ({len(labels)}) differ in length")
        L = self.seq_length
        n = _stream_length(len(input_ids), L, self.overlong)
        if len(input_ids) + 1 > L:
            self.stats.overlong += 1
            if n == 0:
                self.stats.skipped += 1
                return 0
            if n < len(input_ids) + 1:
                # truncated: its first n tokens and no EOS, so no stop is taught where the sample did not end
                self.stats.truncated += 1
                self._ids.extend(input_ids[:n])
                self._labels.extend(labels[:n])
                self._pos.extend(range(n))
                self.stats.documents += 1
                self.stats.tokens += n
                return n
        eos = self.eos_token_id
        self._ids.extend(input_ids)
        self._ids.append(eos)
        self._labels.extend(labels)
        self._labels.append(eos)
        self._pos.extend(range(n))
        self.stats.documents += 1
        self.stats.tokens += n
        return n

    def discard(self, n: int) -> None:
        if n < 0 or n > self.buffered:
            raise ValueError(f"cannot discard {n} of {self.buffered} buffered tokens")
        self._start += n
        self.stats.tokens -= n

    def pop_block(self) -> dict | None:
        L = self.seq_length
        if self.buffered < L:
            return None
        s, e = self._start, self._start + L
        ids, labels, pos = self._ids[s:e], self._labels[s:e], self._pos[s:e]
        if pos[0] != 0:  # a document continued from the previous block restarts at 0
            try:
                k = pos.index(0, 1)
            except ValueError:
                k = L
            pos[:k] = range(k)
        self._start = e
        if self._start >= 4 * L and self._start * 2 >= len(self._ids):
            del self._ids[: self._start], self._labels[: self._start], self._pos[: self._start]
            self._start = 0
        self.stats.blocks += 1
        return {"input_ids": ids, "labels": labels, "position_ids": pos}

    def finish(self) -> int:
        """Drop the incomplete tail (at the end of a finite stream); returns the number of dropped tokens."""
        n = self.buffered
        self.stats.dropped_tail_tokens += n
        self._ids, self._labels, self._pos, self._start = [], [], [], 0
        return n


def pack_examples(
    examples: Iterable[tuple[list[int], list[int]]],
    seq_length: int,
    eos_token_id: int,
    overlong: str = "split",
    stats: PackingStats | None = None,
) -> Iterator[dict]:
    """Pack ``(input_ids, labels)`` samples into blocks ``{"input_ids", "labels", "position_ids"}`` (lists of ints,
    each exactly ``seq_length`` long), like ``ConstantLengthDataset``. Pass a :class:`PackingStats` as ``stats`` to
    get the counts; they are complete once the generator is exhausted.

    ``overlong`` decides what happens to a sample that does not fit one block with its EOS: ``"split"`` lets it
    span blocks, ``"truncate"`` keeps its first ``seq_length`` tokens and no EOS (it is cut, not ended), ``"skip"`` drops it.
    """
    packer = Packer(seq_length, eos_token_id, overlong, stats)
    for input_ids, labels in examples:
        packer.add(input_ids, labels)
        while (block := packer.pop_block()) is not None:
            yield block
    packer.finish()


def _batched(it: Iterator, n: int) -> Iterator[list]:
    while batch := list(islice(it, n)):
        yield batch


class PackedDataset(torch.utils.data.IterableDataset):
    """Packed blocks (``torch.long`` tensors ``input_ids``, ``labels``, ``position_ids`` of shape ``(seq_length,)``)
    from rows ``{"question", "answer"}``.

    ``rows_fn(epoch, start)`` yields the rows of ``epoch`` (in that epoch's order) from row index ``start`` on; the
    Deep Lake source provides it (this rank's shard, seeded order). Finite (``infinite=False``): one epoch per
    iteration, the incomplete tail of the epoch is dropped, and the cursor moves to the next epoch (the Trainer's
    ``set_epoch`` may also set it). Infinite: epochs 0, 1, 2, ... forever, the leftover tokens of one epoch continue
    into the next.

    Resumable cursor (``state_dict()`` / ``load_state_dict()``): ``{"epoch", "row", "skip_tokens", "blocks"}``
    means "the stream continues with row ``row`` of epoch ``epoch``, of whose stream tokens the first
    ``skip_tokens`` were already emitted; ``blocks`` blocks were emitted so far". Resuming re-reads and
    re-tokenizes that row and drops its first ``skip_tokens`` tokens, so the carried-over token buffer is rebuilt
    instead of saved: resume is **exact** (the same blocks, token for token, with the same position_ids) as long as
    ``rows_fn`` returns the same rows for the same (epoch, start), and tokenizer, template, answer_only, overlong
    are unchanged. ``seq_length`` may change on resume (the stream is the same, cut differently).

    The cursor follows the blocks *yielded by this object's iterator*. A consumer that fetches ahead (accelerate's
    DataLoader prefetches one batch) should ask for the state at the number of blocks it has actually trained on:
    ``state_dict(blocks=n)`` (the last ``history`` positions are kept). The cursor lives in the process that
    iterates: use ``num_workers=0`` (more than one worker would duplicate data and is refused).
    Resuming Hugging Face ``Trainer`` with this dataset also needs ``ignore_data_skip=True`` (otherwise it skips
    the already-seen batches a second time by iterating).

    ``stats`` accumulates :class:`PackingStats` over everything this object packed.
    """

    def __init__(
        self,
        rows_fn: Callable[[int, int], Iterator[dict]],
        tokenizer,
        template: str = "default",
        seq_length: int = 512,
        answer_only: bool = False,
        overlong: str = "split",
        infinite: bool = False,
        *,
        eos_token_id: int | None = None,
        batch_rows: int = 256,
        history: int = 4096,
    ):
        super().__init__()
        check_packing_args(seq_length, overlong)
        self.rows_fn = rows_fn
        self.tokenizer = tokenizer
        self.template = template
        self.seq_length = seq_length
        self.answer_only = answer_only
        self.overlong = overlong
        self.infinite = infinite
        self.eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        if self.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token; set one (tokenizer.eos_token) to pack samples")
        self.batch_rows = batch_rows
        self.formatter = Formatter(tokenizer, template, answer_only)
        self.stats = PackingStats()
        #: warn at the first overlong sample met (set when no counting pass reported them before training)
        self.report_overlong = False
        self._reported = False
        self._cursor = (0, 0, 0)  # (epoch, row, skip_tokens)
        self._blocks = 0
        self._history: deque[tuple[int, tuple[int, int, int]]] = deque(maxlen=max(1, history))
        self._history.append((0, self._cursor))

    @classmethod
    def for_source(cls, data, tokenizer, source, infinite: bool) -> "PackedDataset":
        """The packed stream of a :class:`~sft.data.source.ShardedSource` with the ``data:`` settings of a run
        (``data`` a DataConfig: template, seq_length, answer_only, overlong)."""
        return cls(rows_fn=source.iter_rows, tokenizer=tokenizer, template=data.template,
                   seq_length=data.seq_length, answer_only=data.answer_only, overlong=data.overlong,
                   infinite=infinite)

    # -- cursor ---------------------------------------------------------------------------------------------
    def state_dict(self, blocks: int | None = None) -> dict:
        """The cursor after the last yielded block, or after exactly ``blocks`` blocks (must be recent)."""
        if blocks is None:
            n, (epoch, row, skip) = self._blocks, self._cursor
        else:
            for n, (epoch, row, skip) in reversed(self._history):
                if n == blocks:
                    break
            else:
                lo = self._history[0][0]
                raise ValueError(
                    f"no cursor recorded after {blocks} blocks (recorded: {lo}..{self._blocks}); raise `history`"
                )
        return {"epoch": epoch, "row": row, "skip_tokens": skip, "blocks": n}

    def load_state_dict(self, state: dict) -> None:
        self._cursor = (int(state["epoch"]), int(state["row"]), int(state.get("skip_tokens", 0)))
        self._blocks = int(state.get("blocks", 0))
        self._history.clear()
        self._history.append((self._blocks, self._cursor))

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer / accelerate at each epoch start. Finite mode: start ``epoch`` from its first row
        unless the cursor is already inside it (a resumed run). Infinite mode: ignored (the cursor is the truth)."""
        if not self.infinite and self._cursor[0] != epoch:
            self._cursor = (int(epoch), 0, 0)
            self._history.append((self._blocks, self._cursor))

    # -- iteration ------------------------------------------------------------------------------------------
    def _record(self, cursor: tuple[int, int, int]) -> None:
        self._cursor = cursor
        self._history.append((self._blocks, cursor))

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ConfigError(
                "PackedDataset reads one cursor and cannot be split across DataLoader workers "
                f"(num_workers={info.num_workers}); use dataloader_num_workers: 0"
            )
        L = self.seq_length
        packer = Packer(L, self.eos_token_id, self.overlong, self.stats)
        # rows with tokens still in the buffer, oldest first: [epoch, row, stream tokens of the row, still buffered]
        pending: deque[list[int]] = deque()
        epoch, start, skip = self._cursor
        next_row = (epoch, start, 0)  # the cursor when nothing is buffered

        def emit() -> Iterator[dict]:
            while (block := packer.pop_block()) is not None:
                left = L
                while left or (pending and pending[0][3] == 0):
                    head = pending[0]
                    take = min(left, head[3])
                    head[3] -= take
                    left -= take
                    if head[3] == 0:
                        pending.popleft()
                self._blocks += 1
                if pending:
                    e, r, total, buffered = pending[0]
                    self._record((e, r, total - buffered))
                else:
                    self._record(next_row)
                yield {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in block.items()}

        while True:
            row, added = start, 0
            for batch in _batched(iter(self.rows_fn(epoch, start)), self.batch_rows):
                for ids, labels in self.formatter.rows(batch):
                    before = self.stats.overlong
                    n = packer.add(ids, labels)
                    if self.report_overlong and self.stats.overlong > before and not self._reported:
                        self._reported = True
                        log.warning(
                            "data.overlong=%s: the sample at position %d of epoch %d has %d tokens, more than data.seq_length=%d allows "
                            "(with its EOS); it was %s. Samples are counted as training meets them (the counting "
                            "pass did not run: training.max_steps is set); summary.json has the count",
                            self.overlong, row, epoch, len(ids), L,
                            {"split": "split across blocks", "truncate": "truncated", "skip": "skipped"}[self.overlong])
                    if skip:  # resuming inside this row: its first `skip` tokens were emitted before
                        if skip >= n:
                            raise DataError(
                                f"cannot resume: row {row} of epoch {epoch} has {n} tokens now but the saved cursor "
                                f"skips {skip}; the rows, tokenizer or template changed since the checkpoint"
                            )
                        packer.discard(skip)
                    pending.append([epoch, row, n, n - skip])
                    skip = 0
                    added += n
                    row += 1
                    next_row = (epoch, row, 0)
                    yield from emit()
            if skip:
                raise DataError(
                    f"cannot resume: epoch {epoch} has no row {start} any more; the dataset changed since the checkpoint"
                )
            if start == 0 and added == 0:
                if self.stats.skipped and not self.stats.documents:
                    raise all_skipped_error(self.stats.skipped, L)
                raise DataError(
                    f"epoch {epoch} produced no tokens (no rows, or every row was skipped as overlong); "
                    "check the dataset and data.overlong"
                )
            epoch, start = epoch + 1, 0
            next_row = (epoch, 0, 0)
            if not self.infinite:
                packer.finish()  # the incomplete last block of the epoch is dropped (counted in stats)
                pending.clear()
                self._record(next_row)
                return
            if not pending:
                self._record(next_row)


def all_skipped_error(skipped: int, seq_length: int) -> DataError:
    return DataError(
        f"data.overlong=skip: all {skipped} samples have more tokens than data.seq_length={seq_length} "
        f"allows (with their EOS), so nothing is left to train on; raise data.seq_length, or keep them with "
        f"data.overlong=split or data.overlong=truncate"
    )


def check_and_report(stats: PackingStats, seq_length: int, overlong: str) -> None:
    """Raise if the overlong policy left nothing to train on; else log how many samples it touched (if any)."""
    if stats.documents == 0 and stats.skipped:
        raise all_skipped_error(stats.skipped, seq_length)
    note = overlong_note(stats, seq_length, overlong)
    if note:
        log.warning(note)  # the run's output names how many samples the policy touched


def overlong_note(stats: PackingStats, seq_length: int, overlong: str) -> str | None:
    """One line saying how many samples the overlong policy affected (None when no sample was overlong)."""
    if not stats.overlong:
        return None
    total = stats.documents + stats.skipped
    what = (f"{stats.overlong} of {total} samples have more tokens than data.seq_length={seq_length} allows "
            f"(with their EOS)")
    if overlong == "skip":
        return f"data.overlong=skip: {what} and were skipped ({stats.skipped} skipped); raise data.seq_length, " \
               f"or keep them with data.overlong=split or truncate"
    if overlong == "truncate":
        return f"data.overlong=truncate: {what} and were truncated to {seq_length} tokens ({stats.truncated} " \
               f"truncated; their ends are not trained on); raise data.seq_length, or keep them whole with " \
               f"data.overlong=split"
    return f"data.overlong=split: {what} and were split across blocks ({stats.overlong} split); raise " \
           f"data.seq_length to keep each in one block"
