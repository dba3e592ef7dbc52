"""sft.data.source: validation of datasets, rank shards, epoch order, resumable cursor, batched reads."""

from __future__ import annotations

import os
import pickle

import deeplake
import pytest

from sft.data.ingest import write_dataset
from sft.data.source import REQUIRED_COLUMNS, ShardedSource, open_dataset, shard_range
from sft.errors import DataError

N = 103  # prime: uneven shards for every world size and a short last block for every read_batch


def _rows(n: int) -> list[dict[str, str]]:
    return [{"question": f"q{i}", "answer": f"a{i}", "source": "t"} for i in range(n)]


def _qa(rows) -> list[tuple[str, str]]:
    return [(r["question"], r["answer"]) for r in rows]


@pytest.fixture(scope="module")
def ds_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("src") / "ds")
    write_dataset(path, _rows(N), progress=False)
    return path


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny") / "ds")
    write_dataset(path, _rows(3), progress=False)
    return path


def _raw(path: str, columns: dict[str, object], data: dict[str, list]) -> str:
    """A dataset with an arbitrary schema (bypassing write_dataset's checks)."""
    ds = deeplake.create(path)
    for name, typ in columns.items():
        ds.add_column(name, typ)
    if data:
        ds.append(data)
    ds.commit()
    return path


class _Spy:
    """Wraps a Deep Lake dataset and records every column read through it: ``(column, start, stop)`` for a slice,
    ``(column, [rows])`` for a list of row indices."""

    def __init__(self, ds):
        self.ds, self.reads = ds, []

    def __getitem__(self, column):
        spy, col = self, self.ds[column]

        class _Col:
            def __getitem__(self, s):
                spy.reads.append((column, s.start, s.stop) if isinstance(s, slice) else (column, list(s)))
                return col[s]

        return _Col()

    def __len__(self):
        return len(self.ds)


# ---------------------------------------------------------------------------------------------- shard_range


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 7, 100, 103])
def test_shard_range_disjoint_covering_balanced(n, world):
    ranges = [shard_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
        assert hi == lo  # contiguous, in rank order: disjoint and gap-free
    sizes = [hi - lo for lo, hi in ranges]
    assert sum(sizes) == n and min(sizes) >= 0
    assert max(sizes) - min(sizes) <= 1
    if world > n:
        assert sizes.count(0) == world - n


@pytest.mark.parametrize("args", [(-1, 0, 1), (10, 1, 1), (10, -1, 2), (10, 0, 0), (10, 0.0, 1), (10, True, 2)])
def test_shard_range_validates(args):
    with pytest.raises(ValueError):
        shard_range(*args)


# ---------------------------------------------------------------------------------------------- shards over a dataset


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sources_disjoint_and_covering(ds_path, tiny_path, world, shuffle):
    for path, n in ((ds_path, N), (tiny_path, 3)):  # tiny: fewer rows than ranks for world 4
        seen: list[tuple[str, str]] = []
        sizes = []
        for rank in range(world):
            src = ShardedSource(path, rank=rank, world_size=world, seed=3, shuffle=shuffle, read_batch=8)
            rows = _qa(src.iter_rows(epoch=1))
            assert len(rows) == src.num_rows and src.total_rows == n
            sizes.append(src.num_rows)
            seen += rows
        assert sorted(seen) == sorted(_qa(_rows(n)))  # every row exactly once over all ranks
        assert max(sizes) - min(sizes) <= 1


def test_unshuffled_is_dataset_order_and_reads_in_batches(ds_path):
    src = ShardedSource(ds_path, rank=1, world_size=2, shuffle=False, read_batch=10)
    lo, hi = src.shard
    spy = _Spy(src.dataset())
    src._ds = spy
    rows = list(src.iter_rows())
    assert rows == [{"question": f"q{i}", "answer": f"a{i}"} for i in range(lo, hi)]
    # Every read is a column slice of at most read_batch rows, and together they cover the shard once per column.
    assert spy.reads and all(stop - start <= 10 for _, start, stop in spy.reads)
    for col in REQUIRED_COLUMNS:
        spans = sorted((s, e) for c, s, e in spy.reads if c == col)
        assert spans[0][0] == lo and spans[-1][1] == hi
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_shuffled_order_permutation_deterministic_and_per_epoch(ds_path):
    a = ShardedSource(ds_path, seed=7, read_batch=16)
    b = ShardedSource(ds_path, seed=7, read_batch=16)
    e0 = _qa(a.iter_rows(0))
    assert sorted(e0) == sorted(_qa(_rows(N)))  # a permutation
    assert e0 != _qa(_rows(N))  # actually shuffled
    assert e0 == _qa(a.iter_rows(0)) == _qa(b.iter_rows(0))  # same (seed, epoch) -> same order, any instance
    e1 = _qa(a.iter_rows(1))
    assert e1 != e0 and sorted(e1) == sorted(e0)  # a different order per epoch
    other_seed = _qa(ShardedSource(ds_path, seed=8, read_batch=16).iter_rows(0))
    assert other_seed != e0
    # Rows of one read come from all over the dataset, not from one run of consecutive rows.
    first_read = sorted(int(q[1:]) for q, _ in e0[:16])
    assert first_read[-1] - first_read[0] > 16


def _sorted_by_source(n_sources: int, per_source: int) -> list[dict[str, str]]:
    return [{"question": f"q{s}-{i}", "answer": f"a{s}-{i}", "source": f"src{s}"}
            for s in range(n_sources) for i in range(per_source)]


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_sees_every_source_of_a_sorted_dataset(tmp_path, world):
    """A dataset ingested sorted by source: within each epoch every rank draws from every source, the ranks
    together read each row exactly once, and the split changes between epochs."""
    rows = _sorted_by_source(4, 30)
    path = str(tmp_path / "sorted")
    write_dataset(path, rows, progress=False)
    source_of = {r["question"]: r["source"] for r in rows}
    splits = []
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            got = [r["question"] for r in ShardedSource(path, rank=rank, world_size=world, seed=11,
                                                        read_batch=16).iter_rows(epoch)]
            assert {source_of[q] for q in got} == {"src0", "src1", "src2", "src3"}, (epoch, rank)
            seen.append(got)
        assert sorted(q for got in seen for q in got) == sorted(source_of)  # each row once per epoch
        splits.append([set(got) for got in seen])
    assert splits[0] != splits[1]  # not a fixed sub-population per rank


def test_shuffled_reads_are_batches_of_row_lists(ds_path):
    src = ShardedSource(ds_path, seed=1, read_batch=16)
    spy = _Spy(src.dataset())
    src._ds = spy
    list(src.iter_rows(0))
    q_reads = [r[1] for r in spy.reads if r[0] == "question"]
    assert [len(r) for r in q_reads] == [16] * (N // 16) + [N % 16]  # read_batch rows per read
    assert sorted(i for r in q_reads for i in r) == list(range(N))  # each row read once


@pytest.mark.parametrize("shuffle", [False, True])
def test_start_resumes_exactly_without_reading_skipped_blocks(ds_path, shuffle):
    src = ShardedSource(ds_path, rank=0, world_size=2, seed=5, shuffle=shuffle, read_batch=8)
    full = list(src.iter_rows(2))
    for start in (0, 1, 7, 8, 9, 30, src.num_rows - 1, src.num_rows):
        assert list(src.iter_rows(2, start)) == full[start:]
    spy = _Spy(src.dataset())
    src._ds = spy
    assert len(list(src.iter_rows(2, src.num_rows - 1))) == 1
    assert len([r for r in spy.reads if r[0] == "question"]) == 1  # only the last block was read


def test_start_past_end_is_an_error(ds_path):
    src = ShardedSource(ds_path)
    with pytest.raises(DataError, match="past the end of this rank's shard"):
        src.iter_rows(0, N + 1)
    with pytest.raises(ValueError):
        src.iter_rows(-1)




def test_empty_shard(tiny_path):
    src = ShardedSource(tiny_path, rank=3, world_size=4)
    assert src.num_rows == 0 and list(src.iter_rows()) == []


def test_pickle_reopens(ds_path):
    src = ShardedSource(ds_path, rank=1, world_size=2, seed=2, read_batch=8)
    clone = pickle.loads(pickle.dumps(src))
    assert list(clone.iter_rows(3, 4)) == list(src.iter_rows(3, 4))


def test_properties(ds_path):
    src = ShardedSource(ds_path, rank=0, world_size=4, read_batch=32)
    assert (src.path, src.total_rows, src.num_rows) == (ds_path, N, 26)
    with pytest.raises(ValueError):
        ShardedSource(ds_path, read_batch=0)
    with pytest.raises(ValueError):
        ShardedSource(ds_path, seed=-1)


def test_file_url(ds_path):
    assert len(open_dataset("file://" + ds_path)) == N


# ---------------------------------------------------------------------------------------------- open_dataset errors


def test_missing_path(tmp_path):
    p = str(tmp_path / "nope")
    with pytest.raises(DataError, match=r"does not exist\. Create one with `sft ingest FILE --out .*nope`"):
        open_dataset(p)
    assert not os.path.exists(p)  # nothing created


def test_plain_folder_is_not_a_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"is not a Deep Lake dataset .*sft ingest FILE --out"):
        ShardedSource(str(tmp_path / "plain"))
    assert os.listdir(tmp_path / "plain") == []  # and nothing was written into it


def test_file_is_not_a_dataset(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"is a file, not a Deep Lake dataset.*sft ingest .*train.jsonl --out"):
        open_dataset(str(f))


def test_deeplake3_layout(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "dataset_meta.json").write_text("{}")
    with pytest.raises(DataError, match="Deep Lake 3.x dataset"):
        open_dataset(str(tmp_path / "old"))


def test_missing_columns_named(tmp_path):
    p = _raw(str(tmp_path / "ds"), {"question": deeplake.types.Text(), "text": deeplake.types.Text()},
             {"question": ["q"], "text": ["t"]})
    with pytest.raises(DataError, match=r"lacks column\(s\) answer \(it has: question, text\).*--map"):
        open_dataset(p)


def test_non_text_column(tmp_path):
    p = _raw(str(tmp_path / "ds"), {"question": deeplake.types.Text(), "answer": deeplake.types.Int32()},
             {"question": ["q"], "answer": [1]})
    with pytest.raises(DataError, match="column 'answer' has type int32, expected text"):
        open_dataset(p)


def test_empty_dataset(tmp_path):
    p = _raw(str(tmp_path / "ds"), {c: deeplake.types.Text() for c in REQUIRED_COLUMNS}, {})
    with pytest.raises(DataError, match="has no rows"):
        open_dataset(p)


def test_none_and_empty_values_name_row_and_column(tmp_path):
    answers = [f"a{i}" for i in range(10)]
    answers[5] = None
    p = _raw(str(tmp_path / "ds"), {c: deeplake.types.Text() for c in REQUIRED_COLUMNS},
             {"question": [f"q{i}" for i in range(10)], "answer": answers})
    src = ShardedSource(p, shuffle=False, read_batch=4)
    with pytest.raises(DataError, match=r"row 5, column 'answer' is empty or missing"):
        list(src.iter_rows())
    # Deep Lake stores "" as None: an empty question reads back the same way and gets the same message.
    p2 = _raw(str(tmp_path / "ds2"), {c: deeplake.types.Text() for c in REQUIRED_COLUMNS},
              {"question": ["q", ""], "answer": ["a", "b"]})
    with pytest.raises(DataError, match=r"row 1, column 'question' is empty"):
        list(ShardedSource(p2).iter_rows())


@pytest.mark.parametrize("url", ["az://account/container/ds", "hub://some-org/some-ds"])
def test_remote_failure_is_wrapped(url):
    # az:// fails on missing credentials and hub:// (alias of al://) on the missing network/token, both fast.
    # (s3:// and gs:// retry for 40-70 s offline, so they are not exercised here.)
    with pytest.raises(DataError, match=f"cannot open remote dataset {url}"):
        open_dataset(url)
