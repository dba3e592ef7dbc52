"""The Deep Lake-free dataset format (sft/data/arrow.py): a directory with one Arrow IPC file, read by the same
ShardedSource as Deep Lake. What the GPU check trains on (its machine has no deeplake)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sft.data.arrow import write_arrow_dataset
from sft.data.ingest import write_dataset
from sft.data.source import ShardedSource, open_dataset
from sft.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def _rows(n):
    return [{"question": f"q{i} " * (1 + i % 5), "answer": f"a{i}", "source": f"s{i % 3}"} for i in range(n)]


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    d = tmp_path_factory.mktemp("arrow")
    write_dataset(str(d / "lake"), _rows(1000), progress=False)
    write_arrow_dataset(str(d / "arrow"), _rows(1000))
    return d


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("world", [1, 3])
def test_arrow_streams_the_same_rows_as_deeplake(both, shuffle, world):
    for rank in range(world):
        kw = dict(rank=rank, world_size=world, seed=7, shuffle=shuffle, read_batch=64)
        lake, arrow = ShardedSource(str(both / "lake"), **kw), ShardedSource(str(both / "arrow"), **kw)
        for epoch, start in ((0, 0), (1, 0), (1, 101)):
            assert list(arrow.iter_rows(epoch, start)) == list(lake.iter_rows(epoch, start))


def test_arrow_is_validated_like_deeplake(tmp_path):
    write_arrow_dataset(str(tmp_path / "noanswer"), [{"question": "q"}], columns=("question",))
    with pytest.raises(DataError, match="lacks column"):
        open_dataset(str(tmp_path / "noanswer"))
    write_arrow_dataset(str(tmp_path / "empty"), [])
    with pytest.raises(DataError, match="no rows"):
        open_dataset(str(tmp_path / "empty"))
    write_arrow_dataset(str(tmp_path / "blank"), [{"question": "q", "answer": ""}])
    with pytest.raises(DataError, match="row 0, column 'answer'"):
        list(ShardedSource(str(tmp_path / "blank")).iter_rows(0))
    with pytest.raises(FileExistsError):
        write_arrow_dataset(str(tmp_path / "blank"), [])


@pytest.mark.multiprocess
def test_arrow_needs_no_deeplake(both):
    """A fresh process where `import deeplake` fails reads and shards the Arrow dataset (the GPU machine)."""
    code = ("import sys; sys.modules['deeplake'] = None\n"
            "from sft.data.source import ShardedSource\n"
            f"s = ShardedSource({str(both / 'arrow')!r}, rank=1, world_size=2)\n"
            "print(s.num_rows, len(list(s.iter_rows(0))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["500", "500"]
