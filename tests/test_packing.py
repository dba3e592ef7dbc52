"""sft.data.packing: constant-length blocks, EOS and document boundaries, overlong policies, the resumable
PackedDataset and count_blocks."""

import itertools
import random

import pytest
import torch

from sft.data.formatting import IGNORE_INDEX, Formatter, prompt_ids, tokenize_example
from sft.data.lengths import count_blocks
from sft.data.packing import Packer, PackedDataset, PackingStats, pack_examples
from sft.errors import ConfigError, DataError
from tests.helpers import make_word_tokenizer

EOS = 0  # synthetic streams use ids >= 1 for content


def synthetic(n_docs, lo=1, hi=30, seed=0, answer_only=False):
    """Samples of distinct token ids (doc d, token i -> 1000 * (d + 1) + i) so every token is traceable."""
    rng = random.Random(seed)
    out = []
    for d in range(n_docs):
        n = rng.randint(lo, hi)
        ids = [1000 * (d + 1) + i for i in range(n)]
        k = rng.randint(0, n) if answer_only else 0
        out.append((ids, [IGNORE_INDEX] * k + ids[k:]))
    return out


def stream_of(examples, eos=EOS):
    ids, labels, starts = [], [], []
    for x, y in examples:
        starts.append(len(ids))
        ids += x + [eos]
        labels += y + [eos]
    return ids, labels, starts


def expected_positions(n_tokens, starts, L):
    """Positions restart at every document start and at every block start."""
    starts = set(starts)
    pos, p = [], 0
    for t in range(n_tokens):
        p = 0 if (t in starts or t % L == 0) else p + 1
        pos.append(p)
    return pos


@pytest.mark.parametrize("L", [2, 7, 16, 64])
def test_blocks_reproduce_the_stream_exactly(L):
    examples = synthetic(50, answer_only=True)
    stats = PackingStats()
    blocks = list(pack_examples(examples, L, EOS, stats=stats))
    ids, labels, starts = stream_of(examples)
    assert all(len(b[k]) == L for b in blocks for k in ("input_ids", "labels", "position_ids"))
    flat = lambda k: list(itertools.chain.from_iterable(b[k] for b in blocks))  # noqa: E731
    n = len(blocks) * L
    # nothing lost, duplicated or reordered; the dropped tail is exactly the rest
    assert flat("input_ids") == ids[:n]
    assert flat("labels") == labels[:n]
    assert stats.dropped_tail_tokens == len(ids) - n < L
    assert flat("position_ids") == expected_positions(len(ids), starts, L)[:n]
    assert stats == PackingStats(documents=50, tokens=len(ids), blocks=len(blocks), dropped_tail_tokens=len(ids) - n,
                                 overlong=sum(len(x) + 1 > L for x, _ in examples), truncated=0, skipped=0)


def test_eos_exactly_once_after_each_sample_and_is_a_label():
    examples = synthetic(40, answer_only=True)
    blocks = list(pack_examples(examples, 16, EOS))
    ids = [t for b in blocks for t in b["input_ids"]]
    labels = [t for b in blocks for t in b["labels"]]
    _, _, starts = stream_of(examples)
    eos_at = [i for i, t in enumerate(ids) if t == EOS]
    expected = [s + len(x) for s, (x, _) in zip(starts, examples) if s + len(x) < len(ids)]
    assert eos_at == expected
    assert all(labels[i] == EOS for i in eos_at)  # even in answer-only mode


def test_position_ids_restart_at_document_starts():
    examples = [([1, 2, 3], [1, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9, 10, 11], [6] * 6), ([12], [12])]
    blocks = list(pack_examples(examples, 5, EOS))
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3, 0, 4], [5, 0, 6, 7, 8], [9, 10, 11, 0, 12]]
    assert [b["position_ids"] for b in blocks] == [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2], [0, 1, 2, 3, 0]]


def test_overlong_policies_and_counts():
    L = 8
    examples = [([1] * 3, [1] * 3), ([2] * 7, [2] * 7), ([3] * 20, [3] * 20), ([4] * 2, [4] * 2)]
    # len 7 + EOS == 8 fits exactly; len 20 is the only overlong sample
    total = 4 + 8 + 21 + 3
    s = PackingStats()
    split = [t for b in pack_examples(examples, L, EOS, "split", s) for t in b["input_ids"]]
    assert (s.overlong, s.truncated, s.skipped, s.documents, s.tokens) == (1, 0, 0, 4, total)
    assert split == stream_of(examples)[0][: len(split)]

    s = PackingStats()
    blocks = list(pack_examples(examples, L, EOS, "truncate", s))
    flat = [t for b in blocks for t in b["input_ids"]]
    # the overlong sample keeps its first seq_length tokens and no EOS (it did not end: no stop is taught)
    truncated = [1] * 3 + [EOS] + [2] * 7 + [EOS] + [3] * 8 + [4] * 2 + [EOS]
    assert flat == truncated[:16] and s.dropped_tail_tokens == 7
    assert (s.overlong, s.truncated, s.skipped, s.documents, s.tokens) == (1, 1, 0, 4, 4 + 8 + 8 + 3)

    s = PackingStats()
    flat = [t for b in pack_examples(examples, L, EOS, "skip", s) for t in b["input_ids"]]
    assert 3 not in flat
    assert (s.overlong, s.truncated, s.skipped, s.documents, s.tokens) == (1, 0, 1, 3, 4 + 8 + 3)
    assert s.blocks == 1 and s.dropped_tail_tokens == 7

    with pytest.raises(ConfigError, match="overlong"):
        list(pack_examples(examples, L, EOS, "wrap"))


def test_packer_compacts_a_huge_document():
    packer = Packer(16, EOS)
    packer.add(list(range(1, 10_001)), list(range(1, 10_001)))
    out = []
    while (b := packer.pop_block()) is not None:
        out += b["input_ids"]
        assert b["position_ids"] == list(range(16))
    assert out == list(range(1, 10_001))[: len(out)] and packer.buffered == 10_001 - len(out)


@pytest.mark.parametrize("template", ["default", "chat"])
def test_answer_only_packed_labels_decode_to_answer_plus_eos(smollm2, template):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"It is {2 * i}."} for i in range(12)]
    examples = [tokenize_example(smollm2, r["question"], r["answer"], template, True) for r in rows]
    eos = smollm2.eos_token_id
    blocks = list(pack_examples(examples, 32, eos))
    labels = [t for b in blocks for t in b["labels"]]
    ids = [t for b in blocks for t in b["input_ids"]]
    pos = 0
    for r, (x, _) in zip(rows, examples):
        doc_ids, doc_labels = ids[pos : pos + len(x) + 1], labels[pos : pos + len(x) + 1]
        if len(doc_ids) < len(x) + 1:
            break  # in the dropped tail
        p = prompt_ids(smollm2, r["question"], template)
        assert doc_ids[: len(p)] == p  # the prompt tokens are exactly what generation feeds the model
        assert doc_labels[: len(p)] == [IGNORE_INDEX] * len(p)  # masked: exactly the prompt
        answer = smollm2.decode(doc_labels[len(p) :])
        assert answer == (" " if template == "default" else "") + r["answer"] + smollm2.eos_token
        pos += len(x) + 1
    assert pos > 0


def test_bos_tokenizer_gets_bos_at_each_sample_start():
    tok = make_word_tokenizer(add_bos=True)
    rows = [("what is 4", "yes"), ("a b c", "no no no"), ("hello", "world")] * 3
    examples = [tokenize_example(tok, q, a, answer_only=True) for q, a in rows]
    blocks = list(pack_examples(examples, 6, tok.eos_token_id))
    ids = [t for b in blocks for t in b["input_ids"]]
    stream, _, starts = stream_of(examples, tok.eos_token_id)
    ends = starts[1:] + [len(stream)]
    assert [i for i, t in enumerate(ids) if t == tok.bos_token_id] == [s for s in starts if s < len(ids)]
    assert [i + 1 for i, t in enumerate(ids) if t == tok.eos_token_id] == [e for e in ends if e <= len(ids)]


# -- PackedDataset --------------------------------------------------------------------------------------------

WORD_ROWS = [
    {"question": " ".join(random.Random(i).choices(["a", "b", "c", "what", "is"], k=1 + i % 5)),
     "answer": " ".join(random.Random(-i).choices(["yes", "no", "4", "2", "+"], k=1 + (3 * i) % 11))}
    for i in range(23)
]


class RowsFn:
    """rows_fn for tests: a per-epoch permutation of a list, recording its calls."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def order(self, epoch):
        idx = list(range(len(self.rows)))
        random.Random(epoch).shuffle(idx)
        return [self.rows[i] for i in idx]

    def __call__(self, epoch, start):
        self.calls.append((epoch, start))
        yield from self.order(epoch)[start:]


def epoch_stream(tok, rows_fn, epochs, answer_only=True):
    fmt = Formatter(tok, "default", answer_only)
    ex = [e for ep in epochs for e in fmt.rows(rows_fn.order(ep))]
    return stream_of(ex, tok.eos_token_id)


def flat(blocks, key):
    return [t for b in blocks for t in b[key].tolist()]


def test_packed_dataset_infinite_continues_across_epochs():
    tok = make_word_tokenizer(add_bos=True)
    rows_fn = RowsFn(WORD_ROWS)
    ds = PackedDataset(rows_fn, tok, "default", seq_length=16, answer_only=True, infinite=True, batch_rows=5)
    ids, labels, _ = epoch_stream(tok, rows_fn, [0, 1, 2, 3])
    n_blocks = len(ids) // 16 - 1  # well past the end of epoch 2
    blocks = list(itertools.islice(iter(ds), n_blocks))
    assert all(b[k].dtype == torch.long and b[k].shape == (16,) for b in blocks for k in b)
    # leftover tokens of one epoch continue into the next: the stream is the concatenation of the epochs
    assert flat(blocks, "input_ids") == ids[: n_blocks * 16]
    assert flat(blocks, "labels") == labels[: n_blocks * 16]
    assert [c[0] for c in rows_fn.calls] == [0, 1, 2, 3] and all(c[1] == 0 for c in rows_fn.calls)
    assert ds.state_dict()["epoch"] == 3


def test_packed_dataset_finite_is_one_epoch_and_matches_count_blocks(smollm2):
    rows = [{"question": f"What is {i} times {i}?", "answer": "The answer is " + str(i * i) + "." * i}
            for i in range(40)]
    rows_fn = RowsFn(rows)
    for template in ("default", "chat"):
        ds = PackedDataset(rows_fn, smollm2, template, seq_length=64, answer_only=True, batch_rows=16)
        blocks = list(ds)
        stats = count_blocks(rows_fn.order(0), smollm2, template, 64, answer_only=True)
        assert len(blocks) == stats.blocks > 0
        assert ds.stats == stats
        assert ds.state_dict() == {"epoch": 1, "row": 0, "skip_tokens": 0, "blocks": len(blocks)}
        # the next iteration is the next epoch; the Trainer's set_epoch can also choose it
        rows_fn.calls.clear()
        assert len(list(ds)) > 0 and rows_fn.calls == [(1, 0)]
        ds.set_epoch(0)
        rows_fn.calls.clear()
        assert len(list(ds)) == stats.blocks and rows_fn.calls == [(0, 0)]


@pytest.mark.parametrize("overlong", ["split", "truncate", "skip"])
def test_count_blocks_agrees_with_packing_for_each_overlong_policy(overlong):
    tok = make_word_tokenizer(add_bos=False)
    rows_fn = RowsFn(WORD_ROWS)
    ds = PackedDataset(rows_fn, tok, seq_length=8, overlong=overlong)
    n = len(list(ds))
    stats = count_blocks(rows_fn.order(0), tok, "default", 8, overlong=overlong)
    assert n == stats.blocks and ds.stats == stats
    assert stats.overlong > 0


@pytest.mark.parametrize("k", [0, 1, 5, 9, 17, 36, 37])  # 36, 37: across the epoch boundary
def test_state_dict_resumes_exactly(k):
    tok = make_word_tokenizer(add_bos=True)
    make = lambda fn: PackedDataset(fn, tok, seq_length=8, answer_only=True, infinite=True, batch_rows=4)  # noqa
    ref = list(itertools.islice(iter(make(RowsFn(WORD_ROWS))), k + 12))

    ds = make(RowsFn(WORD_ROWS))
    it = iter(ds)
    head = list(itertools.islice(it, k))
    state = ds.state_dict()
    assert state["blocks"] == k

    rows_fn = RowsFn(WORD_ROWS)
    resumed = make(rows_fn)
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), 12))
    assert rows_fn.calls[0] == (state["epoch"], state["row"])  # reads from the saved row on
    for a, b in zip(head + tail, ref, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in ("input_ids", "labels", "position_ids"))
    assert resumed.state_dict()["blocks"] == k + 12


def test_state_dict_at_a_consumed_block_count_covers_prefetch():
    tok = make_word_tokenizer(add_bos=False)
    make = lambda fn: PackedDataset(fn, tok, seq_length=8, infinite=True)  # noqa
    ref = list(itertools.islice(iter(make(RowsFn(WORD_ROWS))), 20))
    ds = make(RowsFn(WORD_ROWS))
    list(itertools.islice(iter(ds), 14))  # the consumer trained on 10, 4 are prefetched
    state = ds.state_dict(blocks=10)
    assert state["blocks"] == 10
    resumed = make(RowsFn(WORD_ROWS))
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), 10))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(tail, ref[10:], strict=True))
    with pytest.raises(ValueError, match="history"):
        ds.state_dict(blocks=99)


def test_finite_resume_mid_epoch_then_rest_of_epoch():
    tok = make_word_tokenizer(add_bos=False)
    full = list(PackedDataset(RowsFn(WORD_ROWS), tok, seq_length=8))
    ds = PackedDataset(RowsFn(WORD_ROWS), tok, seq_length=8)
    list(itertools.islice(iter(ds), 3))
    resumed = PackedDataset(RowsFn(WORD_ROWS), tok, seq_length=8)
    resumed.load_state_dict(ds.state_dict())
    resumed.set_epoch(0)  # the Trainer calls this at the start of the (resumed) epoch: must not rewind
    rest = list(resumed)
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rest, full[3:], strict=True))


def test_empty_epoch_is_an_error_not_a_hang():
    tok = make_word_tokenizer(add_bos=False)
    ds = PackedDataset(lambda epoch, start: iter(()), tok, seq_length=8, infinite=True)
    with pytest.raises(DataError, match="no tokens"):
        next(iter(ds))


def test_resume_against_a_changed_dataset_is_an_error():
    tok = make_word_tokenizer(add_bos=False)
    ds = PackedDataset(RowsFn(WORD_ROWS), tok, seq_length=8)
    ds.load_state_dict({"epoch": 0, "row": 2, "skip_tokens": 999, "blocks": 5})
    with pytest.raises(DataError, match="cannot resume"):
        list(ds)
    ds.load_state_dict({"epoch": 0, "row": len(WORD_ROWS) + 5, "skip_tokens": 3, "blocks": 5})
    with pytest.raises(DataError, match="cannot resume"):
        list(ds)


def test_truncated_sample_ends_without_a_trained_eos():
    """data.overlong=truncate used to append a labelled EOS after the cut, teaching the model to stop mid-answer."""
    L = 8
    blocks = list(pack_examples([([3] * 20, [3] * 20), ([4] * 2, [4] * 2)], L, EOS, "truncate"))
    assert blocks[0]["input_ids"] == [3] * L and blocks[0]["labels"] == [3] * L
    assert blocks[0]["position_ids"] == list(range(L))


def test_first_token_of_each_packed_document_is_not_a_target():
    """With isolated documents, doc 1's EOS must not be trained to predict doc 2's first token (the label shift
    would make it a cross-document target); without isolation (position_ids off: the seed's packing) it stays."""
    from sft.trainer.trainer import Collator as _Collator

    block = next(pack_examples([([1] * 3, [1] * 3), ([2] * 4, [2] * 4)], 9, EOS, "split"))
    feats = [{k: torch.tensor(v) for k, v in block.items()}]
    labels = _Collator(position_ids=True)(feats)["labels"][0].tolist()
    # position 0's label is never a target (the shift drops it); position 4 is doc 2's first token
    assert labels[1:] == [1, 1, EOS, IGNORE_INDEX, 2, 2, 2, EOS]
    assert feats[0]["labels"].tolist()[4] == 2  # the dataset's own tensors are not modified
    assert _Collator(position_ids=False)(feats)["labels"][0].tolist()[4] == 2
