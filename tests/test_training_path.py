"""What the training path computes and when (the correctness issue): work skipped when it is not needed."""

from __future__ import annotations

from sft.data.ingest import write_dataset
from tests.test_bad_input import sft, train_args  # noqa: F401  (the in-process CLI fixture)


def test_max_steps_starts_without_counting_the_shard(sft, tmp_path, monkeypatch):  # noqa: F811
    """With training.max_steps set (and no per-epoch schedule) the rank's shard is not tokenized before step 1."""
    import sft.data.packing as packing

    write_dataset(str(tmp_path / "d"), [{"question": f"q {i}", "answer": f"a {i}", "source": "t"} for i in range(40)],
                  progress=False)
    calls = []
    real = packing.count_blocks
    monkeypatch.setattr(packing, "count_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = sft(*train_args(tmp_path / "out", tmp_path / "d", "training.max_steps=2"))
    assert r.rc == 0, r.err[-3000:]
    assert calls == [], "the shard was tokenized to count steps although max_steps was set"
    # an epoch schedule still needs the count
    r = sft(*train_args(tmp_path / "out2", tmp_path / "d", "training.max_steps=2", "training.save_strategy=epoch"))
    assert r.rc == 0, r.err[-3000:]
    assert calls, "save_strategy=epoch needs the steps per epoch"
