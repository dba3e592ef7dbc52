"""sft.data.lengths / sft.data.steps: the counting pass, its per-dataset cache, and block counts from lengths."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from sft.data.formatting import Formatter
from sft.data.ingest import write_dataset
from sft.data.lengths import cache_key, dataset_identity, dataset_lengths, stream_stats
from sft.data.lengths import count_blocks
from sft.data.packing import PackedDataset
from sft.data.source import ShardedSource
from sft.data.steps import rank_shares
from tests.helpers import load_smollm2, smollm2_cache_root


@pytest.fixture(scope="module")
def tok(request):
    return load_smollm2(smollm2_cache_root(request))


def _rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"question": " ".join(f"w{rng.randint(0, 99)}" for _ in range(rng.randint(1, 12))),
             "answer": " ".join(f"v{rng.randint(0, 99)}" for _ in range(rng.randint(1, 40))), "source": "t"}
            for _ in range(n)]


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("lengths") / "ds")
    write_dataset(path, _rows(150), progress=False)
    return path


@pytest.mark.parametrize("overlong", ["split", "truncate", "skip"])
@pytest.mark.parametrize("template, answer_only", [("default", False), ("chat", True)])
def test_blocks_from_lengths_equal_a_packing_pass(tok, ds, tmp_path, overlong, template, answer_only):
    """The cached lengths give, for any rank's share of any epoch, what packing that share really yields."""
    src = ShardedSource(ds, shuffle=False)
    lengths = dataset_lengths(src, tok, template, answer_only, str(tmp_path / "c")).lengths
    for world, rank, epoch in ((1, 0, 0), (2, 1, 0), (3, 0, 2)):
        share = ShardedSource(ds, rank=rank, world_size=world, seed=9)
        idx = rank_shares(share.total_rows, world, True, 9, epoch)[rank]
        assert idx.tolist() == share.indices(epoch).tolist()  # the rows the source streams
        for L in (64, 160):
            want = count_blocks(share.iter_rows(epoch), tok, template, L, answer_only=answer_only, overlong=overlong)
            got = stream_stats(lengths[idx], L, overlong)
            assert got == want, (world, rank, epoch, L)
            packed = PackedDataset(share.iter_rows, tok, template, L, answer_only, overlong, infinite=False)
            packed.set_epoch(epoch)
            assert sum(1 for _ in packed) == got.blocks


def test_counted_once_then_cached_keyed_by_version_and_settings(tok, tmp_path):
    path, cache = str(tmp_path / "ds"), str(tmp_path / "cache")
    write_dataset(path, _rows(40), progress=False)
    src = ShardedSource(path)
    first = dataset_lengths(src, tok, "default", False, cache)
    again = dataset_lengths(ShardedSource(path), tok, "default", False, cache)
    assert not first.cached and again.cached and np.array_equal(first.lengths, again.lengths)
    assert not dataset_lengths(src, tok, "chat", False, cache).cached  # another formatting: another entry
    assert not dataset_lengths(src, tok, "default", True, cache).cached
    # re-ingested with other rows (same path, same row count): a new version, never the stale entry
    old_key = cache_key(dataset_identity(path, src.dataset()), tok, "default", False)
    write_dataset(path, _rows(40, seed=1), progress=False, overwrite=True)
    src2 = ShardedSource(path)
    assert cache_key(dataset_identity(path, src2.dataset()), tok, "default", False) != old_key
    fresh = dataset_lengths(src2, tok, "default", False, cache)
    assert not fresh.cached
    fmt = Formatter(tok, "default", False)
    assert fresh.lengths.tolist() == [len(i) for i, _ in fmt.rows(list(ShardedSource(path, shuffle=False).iter_rows()))]
    assert not dataset_lengths(src2, tok, "default", False, None).cached  # no cache folder: always counted


def _train(sft, out, ds, *extra):
    from tests.helpers import train_args

    r = sft(*train_args(out, ds, "training.max_steps=-1", "training.num_epochs=1", "data.seq_length=128", *extra))
    assert r.rc == 0, r.err
    return json.loads((out / "summary.json").read_text())["summary"], r


@pytest.mark.slow
def test_second_run_starts_from_the_cache(sft, tmp_path, monkeypatch):
    """Training by epochs counts once; a second run on the same dataset version reads the count, takes the same
    number of steps, and runs no counting pass (it never tokenizes for counting)."""
    import sft.data.lengths as lengths_mod

    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path / "cache"))
    ds = tmp_path / "ds"
    write_dataset(str(ds), _rows(24), progress=False)
    first, _ = _train(sft, tmp_path / "a", ds)
    calls = []
    real = lengths_mod.count_lengths
    monkeypatch.setattr(lengths_mod, "count_lengths", lambda *a, **k: calls.append(1) or real(*a, **k))
    second, _ = _train(sft, tmp_path / "b", ds)
    assert (first["data_counting"], second["data_counting"]) == ("counted", "cached")
    assert second["steps"] == first["steps"] >= 1 and calls == []
    third, _ = _train(sft, tmp_path / "c", ds, "data.length_cache=null")
    assert third["data_counting"] == "counted" and third["steps"] == first["steps"] and calls == [1]
