"""The bad-input catalogue (issue #6): every item through the entry point users hit, with the exact message fragment
(the problem *and* the fix), no partial output left behind, and for fail-fast cases no model loaded.

Most items run the real CLI in this process (``sft.cli.main``: argument parsing, the error line, exit status 2)
because a subprocess pays ~8 s of imports per call on a small machine; the disk-full items need a subprocess (a
file-size limit applies to a whole process). Fail-fast train / merge cases run with model loading replaced by an
assertion, so "fails before the model loads" is checked, not inferred from timing.

Catalogue (item -> test):

==========================================  ========================================================
missing / extra columns at ingest           test_missing_column_at_ingest, test_extra_columns_...
dataset without question / answer (train)   test_dataset_without_question_answer_at_train
empty input file / 0-row dataset            test_empty_file_at_ingest, test_empty_dataset_at_train
non-text values                             test_non_text_values_..., test_unpaired_surrogate_...
sample longer than seq_length               test_overlong_policies_count..., test_overlong_..._train
unknown config key / wrong type             test_unknown_config_key, test_wrong_type
missing / unreadable paths                  test_missing_*, test_unreadable_ingest_input
read-only output directory                  test_unwritable_output, test_output_dir_below_a_file
disk full (simulated with ulimit -f)        test_disk_full_at_ingest, test_disk_full_at_merge
adapter / base mismatch at merge            test_adapter_base_mismatch_at_merge
GGUF file not found                         test_gguf_not_found
not a Deep Lake dataset                     test_not_a_deeplake_dataset
hub id without network                      test_hub_id_without_network_fails_fast
==========================================  ========================================================
"""

from __future__ import annotations

import glob
import json
import os
import random
import resource
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import deeplake
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sft.data.ingest import write_dataset
from tests.helpers import train_args

SFT = [sys.executable, "-m", "sft.cli"]

# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the case under test must be refused before that."""
    import sft.merging.check
    import sft.models

    def boom(*a, **k):
        raise AssertionError("a model was loaded; the error should have come before that")

    monkeypatch.setattr(sft.models, "load_model_and_tokenizer", boom)
    monkeypatch.setattr(sft.models, "load_base_model", boom)
    monkeypatch.setattr(sft.merging.check, "_reference_base", boom)


def assert_nothing_left(path) -> None:
    """No output at ``path`` and no temporary / backup siblings of it."""
    path = str(path)
    assert not os.path.lexists(path), f"{path} was left behind"
    assert glob.glob(glob.escape(path) + ".tmp*") == [] and glob.glob(glob.escape(path) + ".old*") == []


def jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def qa_rows(n: int, long_every: int = 0, long_len: int = 300) -> list[dict[str, str]]:
    rows = []
    for i in range(n):
        long = long_every and i % long_every == long_every - 1
        answer = " ".join(f"word{j}" for j in range(long_len // 6)) if long else f"Item {i} is red."
        rows.append({"question": f"What colour is item {i}?", "answer": answer, "source": "t.jsonl"})
    return rows


def raw_dataset(path: Path, data: dict[str, list], types: dict | None = None) -> Path:
    """A Deep Lake dataset with any schema (bypassing write_dataset's checks)."""
    ds = deeplake.create(str(path))
    for name in data:
        ds.add_column(name, (types or {}).get(name, deeplake.types.Text()))
    if any(data.values()):
        ds.append(data)
    ds.commit()
    return path


@pytest.fixture(scope="module")
def good_ds(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "ds"
    write_dataset(str(path), qa_rows(32), progress=False)
    return path


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """An adapter as training saves it (tiny-llama, fp32, LoRA on q_proj / v_proj), its base materialised."""
    import torch

    from sft.config import ModelConfig
    from sft.models import materialize_arch
    from tests.helpers import make_adapter

    path = make_adapter(tmp_path_factory.mktemp("adapter") / "adapter",
                        ModelConfig(name="arch:tiny-llama", dtype="fp32"), targets=("q_proj", "v_proj"))
    materialize_arch("tiny-llama", 0, dtype=torch.float32)  # the merge's base, cached (not written under a limit)
    return path


def _file_size_limit(n: int):
    def preexec():
        # SIGXFSZ would kill the process at the limit; ignored, the write fails with EFBIG like on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))

    return preexec


def run_limited(args, cwd: Path, limit: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([*SFT, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=_file_size_limit(limit))


# ---------------------------------------------------------------------------------------------- columns


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_missing_column_at_ingest(sft, tmp_path, fmt):
    src = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        jsonl(src, [{"question": "q", "output": "a"}])
        fragment = (f"{src} line 1: missing field 'answer' for answer (the record has: question, output). Map your "
                    f"field names with --map answer=FIELD")
    elif fmt == "csv":
        src.write_text("question,output\nq,a\n")
        fragment = (f"{src} line 1 (header): no column 'answer' for answer (columns: question, output). Map your "
                    f"column names with --map answer=COLUMN")
    else:
        pq.write_table(pa.table({"question": ["q"], "output": ["a"]}), src)
        fragment = (f"{src} schema: no column 'answer' for answer (columns: question, output). Map your column "
                    f"names with --map answer=COLUMN")
    r = sft("ingest", src, "--out", tmp_path / "ds")
    assert r.rc == 2 and fragment in r.err, r.err
    assert_nothing_left(tmp_path / "ds")


def test_extra_columns_are_ignored_with_a_note(sft, tmp_path):
    """Policy: extra fields are not an error (exports carry ids, metadata...), but each input's ignored fields are
    named, so that a forgotten one (Alpaca's `input`) is noticed, with the option that reads it."""
    a = jsonl(tmp_path / "a.jsonl", [{"id": 1, "question": "q", "answer": "a", "input": "ctx"}])
    b = tmp_path / "b.csv"
    b.write_text("question,answer,meta\nq,a,m\n")
    c = tmp_path / "c.jsonl"
    jsonl(c, [{"question": "q", "answer": "a"}])
    r = sft("ingest", a, b, c, "--out", tmp_path / "ds")
    assert r.rc == 0, r.err
    assert f"note: {a}: ignored field(s) id, input (only question, answer and source are kept; read a field " \
           f"instead with --map TARGET=FIELD)" in r.out
    assert f"note: {b}: ignored field(s) meta" in r.out
    assert f"note: {c}" not in r.out
    ds = deeplake.open_read_only(str(tmp_path / "ds"))
    assert sorted(col.name for col in ds.schema.columns) == ["answer", "question", "source"]
    # a mapped field is read, not ignored
    r = sft("ingest", a, "--out", tmp_path / "ds2", "--map", "source=input")
    assert r.rc == 0 and "ignored field(s) id (" in r.out, r.out


def test_dataset_without_question_answer_at_train(sft, tmp_path, no_model_load):
    ds = raw_dataset(tmp_path / "ds", {"question": ["q"], "text": ["t"]})
    r = sft(*train_args(tmp_path / "out", ds))
    assert r.rc == 2
    assert (f"dataset {ds} lacks column(s) answer (it has: question, text). Training needs text columns question, "
            f"answer; re-create it with `sft ingest FILE --out NEW_PATH --map question=FIELD answer=FIELD`") in r.err
    assert_nothing_left(tmp_path / "out")


def test_extra_columns_in_a_dataset_are_ignored(tmp_path):
    from sft.data.source import ShardedSource

    ds = raw_dataset(tmp_path / "ds", {"question": ["q0", "q1"], "answer": ["a0", "a1"], "source": ["s", "s"],
                                       "score": ["1", "2"]})
    assert list(ShardedSource(str(ds), shuffle=False).iter_rows()) == [
        {"question": "q0", "answer": "a0"}, {"question": "q1", "answer": "a1"}]


# ---------------------------------------------------------------------------------------------- empty


def test_empty_file_at_ingest(sft, tmp_path):
    for name, text in (("e.jsonl", ""), ("h.csv", "question,answer\n")):
        (tmp_path / name).write_text(text)
        r = sft("ingest", tmp_path / name, "--out", tmp_path / "sub" / "ds")
        assert r.rc == 2
        assert f"{tmp_path / name}: no rows (the file holds no records); remove it from the inputs" in r.err
        assert_nothing_left(tmp_path / "sub" / "ds")
        assert not (tmp_path / "sub").exists()  # nor the parent folder it created


def test_empty_dataset_at_train(sft, tmp_path, no_model_load):
    ds = raw_dataset(tmp_path / "ds", {"question": [], "answer": []})
    r = sft(*train_args(tmp_path / "out", ds))
    assert r.rc == 2
    assert f"dataset {ds} has no rows. Fill it with `sft ingest FILE --out {ds} --overwrite`." in r.err
    assert_nothing_left(tmp_path / "out")


# ---------------------------------------------------------------------------------------------- non-text values


@pytest.mark.parametrize("value, shown", [(3, "int 3"), (None, "null/None"), (["a", "b"], "list ['a', 'b']"),
                                          (2.5, "float 2.5"), (True, "bool True")])
def test_non_text_values_name_file_row_and_column(sft, tmp_path, value, shown):
    src = jsonl(tmp_path / "v.jsonl", [{"question": "q", "answer": "a"}, {"question": value, "answer": "a"}])
    r = sft("ingest", src, "--out", tmp_path / "ds")
    assert r.rc == 2
    assert (f"{src} line 2: field 'question' (question) must be text, got {shown}. Only strings are ingested "
            f"(numbers and nulls are not converted); fix the value or --map question=FIELD to the right field") in r.err
    assert_nothing_left(tmp_path / "ds")


def test_unpaired_surrogate_is_not_text(sft, tmp_path):
    """JSON can spell a lone UTF-16 surrogate; it is no text (Deep Lake failed on it with a C++ cast error)."""
    src = tmp_path / "s.jsonl"
    src.write_text('{"question": "ok \\ud83d\\ude00", "answer": "a"}\n{"question": "q", "answer": "bad \\ud800"}\n')
    r = sft("ingest", src, "--out", tmp_path / "ds")
    assert r.rc == 2
    assert (f"{src} line 2: field 'answer' holds an unpaired UTF-16 surrogate ('\\ud800' at character 4), which is "
            f"not valid text; fix that escape sequence in the file") in r.err, r.err
    assert_nothing_left(tmp_path / "ds")


def test_non_text_parquet_column(sft, tmp_path):
    src = tmp_path / "n.parquet"
    pq.write_table(pa.table({"question": ["a", "b"], "answer": [1, 2]}), src)
    r = sft("ingest", src, "--out", tmp_path / "ds")
    assert r.rc == 2 and f"{src} row 1: field 'answer' (answer) must be text, got int 1" in r.err, r.err
    assert_nothing_left(tmp_path / "ds")


# ---------------------------------------------------------------------------------------------- overlong samples


@pytest.fixture(scope="module")
def overlong_ds(tmp_path_factory) -> Path:
    """10 rows, every 5th with a ~300-character answer: 2 samples longer than 64 byte tokens."""
    path = tmp_path_factory.mktemp("overlong") / "ds"
    write_dataset(str(path), qa_rows(10, long_every=5), progress=False)
    return path


@pytest.mark.parametrize("policy, counts, note", [
    ("split", (2, 0, 0, 10), "data.overlong=split: 2 of 10 samples have more tokens than data.seq_length=64 allows "
                             "(with their EOS) and were split across blocks (2 split); raise data.seq_length"),
    ("truncate", (2, 2, 0, 10), "data.overlong=truncate: 2 of 10 samples have more tokens than data.seq_length=64 "
                                "allows (with their EOS) and were truncated to 64 tokens (2 truncated"),
    ("skip", (2, 0, 2, 8), "data.overlong=skip: 2 of 10 samples have more tokens than data.seq_length=64 allows "
                           "(with their EOS) and were skipped (2 skipped); raise data.seq_length, or keep them with "
                           "data.overlong=split or truncate"),
])
def test_overlong_policies_count_and_report(overlong_ds, caplog, policy, counts, note):
    """The counting pass training runs (count_blocks over the Deep Lake source) reports the affected samples; the
    packer that feeds the trainer counts the same."""
    from sft.data.lengths import count_blocks
    from sft.data.packing import PackedDataset
    from sft.data.source import ShardedSource
    from sft.models import byte_tokenizer

    tok = byte_tokenizer()
    src = ShardedSource(str(overlong_ds), shuffle=False)
    with caplog.at_level("WARNING", logger="sft.data.packing"):
        stats = count_blocks(src.iter_rows(0), tok, "default", 64, overlong=policy)
    assert (stats.overlong, stats.truncated, stats.skipped, stats.documents) == counts
    assert any(note in m for m in caplog.messages), caplog.messages
    packed = PackedDataset(src.iter_rows, tok, seq_length=64, overlong=policy)
    assert len(list(packed)) == stats.blocks and packed.stats == stats
    if policy == "skip":  # a skipped sample leaves no token behind: the counts equal those of the short rows alone
        short_rows = [r for r in src.iter_rows(0) if len(r["answer"]) < 64]
        short = count_blocks(short_rows, tok, "default", 64, overlong="skip")
        assert len(short_rows) == 8 and short.overlong == 0
        assert (stats.documents, stats.tokens, stats.blocks) == (short.documents, short.tokens, short.blocks)


def test_overlong_count_is_reported_by_train(sft, tmp_path, caplog):
    """Training by epochs counts every row before the first step: the report covers the whole dataset."""
    ds = tmp_path / "ds"
    write_dataset(str(ds), qa_rows(12, long_every=4), progress=False)
    with caplog.at_level("WARNING", logger="sft.data.packing"):
        r = sft(*train_args(tmp_path / "out", ds, "data.overlong=skip", "training.max_steps=-1",
                            "training.num_epochs=1"))
    assert r.rc == 0, r.err
    assert any("data.overlong=skip: 3 of 12 samples have more tokens than data.seq_length=32 allows" in m
               and "(3 skipped)" in m for m in caplog.messages), caplog.messages


def test_overlong_met_in_training_is_reported_when_counting_is_skipped(sft, tmp_path, caplog):
    """With max_steps set no counting pass runs: the first overlong sample training meets is reported, and the
    summary counts those it met."""
    ds = tmp_path / "ds"
    write_dataset(str(ds), qa_rows(12, long_every=4), progress=False)
    with caplog.at_level("WARNING", logger="sft.data.packing"):
        r = sft(*train_args(tmp_path / "out", ds, "data.overlong=skip", "training.max_steps=2"))
    assert r.rc == 0, r.err
    assert any("data.overlong=skip: the sample at position" in m and "it was skipped" in m
               for m in caplog.messages), caplog.messages
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["summary"]
    assert summary["data_counting"] == "skipped"
    assert summary["packing"]["skipped"] >= 1 and summary["packing"]["overlong"] == summary["packing"]["skipped"]


def test_every_sample_skipped_is_an_error(sft, tmp_path):
    ds = tmp_path / "ds"
    write_dataset(str(ds), qa_rows(4, long_every=1), progress=False)
    r = sft(*train_args(tmp_path / "out", ds, "data.overlong=skip"))
    assert r.rc == 2
    assert ("data.overlong=skip: all 4 samples have more tokens than data.seq_length=32 allows (with their EOS), so "
            "nothing is left to train on; raise data.seq_length, or keep them with data.overlong=split") in r.err
    assert_nothing_left(tmp_path / "out")


# ---------------------------------------------------------------------------------------------- config


def test_unknown_config_key(sft, tmp_path, good_ds):
    out = tmp_path / "out"
    r = sft(*train_args(out, good_ds, "training.lerning_rate=1e-3"))
    assert r.rc == 2
    assert ("error: unknown config key 'training.lerning_rate' (did you mean 'training.learning_rate'?); "
            "`sft train --help-config` lists every key") in r.err
    y = tmp_path / "run.yaml"
    y.write_text("model:\n  name: arch:tiny-llama\ntraining:\n  lerning_rate: 0.001\n")
    r = sft("train", "--config", y)
    assert r.rc == 2 and f"error: {y}: unknown config key 'training.lerning_rate' (did you mean " \
                          f"'training.learning_rate'?)" in r.err, r.err
    y.write_text("max_steps: 5\n")  # a key without its section
    r = sft("train", "--config", y)
    assert r.rc == 2 and f"{y}: unknown config key 'max_steps' (did you mean 'training.max_steps'?)" in r.err
    assert_nothing_left(out)


@pytest.mark.parametrize("section, key, value, fragment", [
    ("training", "max_steps", "abc", "training.max_steps: expected an integer, got 'abc'"),
    ("data", "seq_length", "-1", "data.seq_length: -1 is below the minimum 8"),
    ("data", "overlong", "wrap", "data.overlong: 'wrap' is not allowed; choose one of 'split', 'truncate', 'skip'"),
    ("training", "merge", "maybe", "training.merge: expected true/false, got 'maybe'"),
])
def test_wrong_type(sft, tmp_path, good_ds, section, key, value, fragment):
    r = sft(*train_args(tmp_path / "out", good_ds, f"{section}.{key}={value}"))  # a CLI override
    assert r.rc == 2 and f"error: {fragment}" in r.err, r.err
    y = tmp_path / "run.yaml"  # the same in a YAML file: the message names the file
    y.write_text(f"{section}:\n  {key}: {value}\n")
    r = sft("train", "--config", y)
    assert r.rc == 2 and f"error: {y}: {fragment}" in r.err, r.err
    assert_nothing_left(tmp_path / "out")


# ---------------------------------------------------------------------------------------------- missing paths


def test_missing_data_path(sft, tmp_path, good_ds, no_model_load):
    nope = tmp_path / "nope"
    r = sft(*train_args(tmp_path / "out", nope))
    assert r.rc == 2 and f"dataset {nope} does not exist. Create one with `sft ingest FILE --out {nope}`." in r.err
    r = sft(*train_args(tmp_path / "out", good_ds, f"data.eval_path={nope}"))
    assert r.rc == 2 and f"dataset {nope} does not exist. Create one with `sft ingest FILE --out {nope}`." in r.err
    assert_nothing_left(tmp_path / "out")


def test_demo_config_never_writes_the_demo_task_into_a_data_path_given_on_the_command_line(sft, tmp_path,
                                                                                          no_model_load):
    """The demo config has demo.generate: true. A user who points it at their own (mistyped, or not yet ingested)
    dataset gets the missing-dataset error, not the demo task written there and trained on; demo.generate=true on
    the command line still asks for it explicitly."""
    nope, also = tmp_path / "my-data", tmp_path / "my-eval"
    args = [a for a in train_args(tmp_path / "out", nope) if a not in ("demo.generate=false", "data.eval_path=null")]
    r = sft(*args, f"data.eval_path={also}")
    assert r.rc == 2 and f"dataset {nope} does not exist. Create one with `sft ingest FILE --out {nope}`." in r.err
    assert "demo.generate=true" in r.out + r.err  # says how to ask for the demo task there
    assert not nope.exists() and not also.exists()
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_max_steps_is_steps_or_minus_one(sft, tmp_path, good_ds, no_model_load, steps):
    r = sft(*train_args(tmp_path / "out", good_ds, f"training.max_steps={steps}"))
    assert r.rc == 2 and f"training.max_steps: {steps} is neither a number of optimizer steps (> 0) nor -1" in r.err
    assert_nothing_left(tmp_path / "out")


def test_which_command_line_datasets_are_the_users():
    from sft.cli import _datasets_given

    assert _datasets_given(["data.path=a", "data.eval_path=b", "training.max_steps=1"]) == {"data.path",
                                                                                           "data.eval_path"}
    assert _datasets_given(["eval_path=b"]) == {"data.eval_path"}  # a bare key of one section
    assert _datasets_given(["data.path=a", "demo.generate=true"]) == set()  # asked for the demo task there
    assert _datasets_given(["training.output_dir=o"]) == set()


def test_missing_config_file(sft, tmp_path):
    r = sft("train", "--config", tmp_path / "nope.yaml")
    assert r.rc == 2 and f"config file {tmp_path / 'nope.yaml'} not found; pass a YAML path or one of: " in r.err
    assert "demo" in r.err


def test_missing_adapter_dir(sft, tmp_path, no_model_load):
    r = sft("merge", "--adapter", tmp_path / "run" / "adapter", "--out", tmp_path / "merged")
    assert r.rc == 2
    assert (f"--adapter {tmp_path / 'run' / 'adapter'} does not exist; pass a run's adapter directory "
            f"(OUTPUT_DIR/adapter) or one of its checkpoints (OUTPUT_DIR/checkpoints/checkpoint-N)") in r.err
    assert_nothing_left(tmp_path / "merged")


def test_missing_ingest_input(sft, tmp_path):
    r = sft("ingest", tmp_path / "absent.jsonl", "--out", tmp_path / "ds")
    assert r.rc == 2 and f"input {tmp_path / 'absent.jsonl'} does not exist; check the path" in r.err
    assert_nothing_left(tmp_path / "ds")


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc")
def test_unreadable_ingest_input(sft, tmp_path):
    """An input that opens but cannot be read (EIO here; EACCES for a user without permission)."""
    r = sft("ingest", "/proc/self/mem", "--format", "jsonl", "--out", tmp_path / "ds")
    assert r.rc == 2
    assert "/proc/self/mem: cannot read it (Input/output error); check the file and its permissions" in r.err
    assert_nothing_left(tmp_path / "ds")


# ---------------------------------------------------------------------------------------------- read-only output


@pytest.fixture
def unwritable(tmp_path):
    """A directory nothing can be created in, for the user running the tests.

    chmod 0o555 is enough for ordinary users; root ignores permission bits, so for root sysfs is used, which refuses
    new entries to everyone. Skipped only if neither refuses a write."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    where = None
    try:
        if not os.access(ro, os.W_OK):
            where = ro
        else:
            try:
                os.rmdir(tempfile.mkdtemp(dir="/sys"))
            except OSError:
                where = Path("/sys")
        if where is None:
            pytest.skip("no directory refuses writes here (running as root, and /sys is writable)")
        yield where
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("command", ["train", "ingest", "merge"])
def test_unwritable_output(sft, tmp_path, unwritable, good_ds, adapter, no_model_load, command):
    out = unwritable / "sft-test-out" / "run"
    if command == "train":
        r = sft(*train_args(out, good_ds))
        fragment = f"training.output_dir: cannot write to {out}: {unwritable} is not writable ("
        fix = "Choose a writable directory: training.output_dir=PATH"
    elif command == "ingest":
        src = jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
        r = sft("ingest", src, "--out", out)
        fragment = f"--out {out}: cannot create the dataset there: {unwritable} is not writable ("
        fix = "Choose a writable --out"
    else:
        r = sft("merge", "--adapter", adapter, "--out", out)
        fragment = f"--out {out}: cannot write the merged model there: {unwritable} is not writable ("
        fix = "Choose a writable --out"
    assert r.rc == 2 and fragment in r.err and fix in r.err, r.err
    assert not (unwritable / "sft-test-out").exists()


def test_output_dir_below_a_file(sft, tmp_path, good_ds, no_model_load):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"
    r = sft(*train_args(out, good_ds))
    assert r.rc == 2
    assert (f"training.output_dir: cannot write to {out}: {tmp_path / 'file'} is a file, not a directory, so nothing "
            f"can be created below it. Choose a writable directory: training.output_dir=PATH") in r.err


# ---------------------------------------------------------------------------------------------- disk full


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.multiprocess
def test_disk_full_at_ingest(tmp_path):
    """Deep Lake 4.7 does not report failed writes (the dataset commits and reads back zeros): ingest reads the
    data back before renaming it into place, and names the cause."""
    rnd = random.Random(0)
    src = jsonl(tmp_path / "big.jsonl", [
        {"question": "".join(rnd.choices(string.ascii_letters, k=100)),
         "answer": "".join(rnd.choices(string.ascii_letters, k=200))} for _ in range(3000)])
    out = tmp_path / "sub" / "ds"
    p = run_limited(["ingest", src, "--out", out], tmp_path, 200_000)
    assert p.returncode == 2, p.stderr
    assert (f"error: --out {out}: writing the dataset failed: the dataset does not read back as written" in p.stderr
            and "likely cause: a file reached the file-size limit (ulimit -f) of 200000 bytes. Nothing was written "
                f"to {out}. Free space (or raise the limit) and run again, or choose another --out" in p.stderr), \
        p.stderr
    assert _leftovers(tmp_path) == ["big.jsonl"]  # no dataset, temp dir, nor the parent folder it created


@pytest.mark.multiprocess
def test_disk_full_at_merge(tmp_path, adapter):
    out = tmp_path / "sub" / "merged"
    p = run_limited(["merge", "--adapter", adapter, "--out", out, "--no-check"], tmp_path, 1_000_000)
    assert p.returncode == 2, p.stderr
    assert (f"error: --out {out}: writing the merged model failed: [Errno 27] File too large; likely cause: a file "
            f"reached the file-size limit (ulimit -f) of 1000000 bytes. Nothing was written to {out}. Free space (or "
            f"raise the limit) and run again, or choose another --out") in p.stderr, p.stderr
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- merge mismatch


@pytest.fixture(scope="module")
def narrow_llama(tmp_path_factory) -> Path:
    """A llama model directory with another hidden size than tiny-llama's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("narrow") / "llama-h64"
    cfg = AutoConfig.for_model("llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("base", ["arch:tiny-opt", "narrow-llama"])
@pytest.mark.parametrize("check", [True, False])
def test_adapter_base_mismatch_at_merge(sft, tmp_path, adapter, narrow_llama, base, check):
    """Another architecture (OPT has q_proj / v_proj too, under other paths: PEFT alone would merge nothing and the
    logits check would pass) and the same architecture with other shapes; with and without the logits check."""
    base = str(narrow_llama) if base == "narrow-llama" else base
    out = tmp_path / "merged"
    r = sft("merge", "--adapter", adapter, "--out", out, "--base", base, *([] if check else ["--no-check"]))
    assert r.rc == 2
    assert f"error: the adapter in {adapter} (trained on arch:tiny-llama) does not fit the base {base}: " in r.err
    assert "Merge onto the base it was trained on: drop --base, or pass --base arch:tiny-llama" in r.err
    assert_nothing_left(out)


# ---------------------------------------------------------------------------------------------- model sources


def test_gguf_not_found(sft, tmp_path, good_ds, no_model_load):
    r = sft(*train_args(tmp_path / "out", good_ds, f"model={tmp_path / 'x.gguf'}"))
    assert r.rc == 2
    assert (f"model.name: GGUF file not found: {tmp_path / 'x.gguf'}. Check the path, or use "
            f"embedded:smollm2-135m-instruct") in r.err
    r = sft(*train_args(tmp_path / "out", good_ds, f"model={tmp_path}", "model.gguf_file=model.gguf"))
    assert r.rc == 2
    assert f"model.gguf_file: GGUF file not found: {tmp_path / 'model.gguf'}; {tmp_path} holds no .gguf file" in r.err
    assert_nothing_left(tmp_path / "out")


@pytest.mark.parametrize("kind", ["empty dir", "dir of jsonl", "file"])
def test_not_a_deeplake_dataset(sft, tmp_path, no_model_load, kind):
    p = tmp_path / "data"
    if kind == "file":
        jsonl(p, [{"question": "q", "answer": "a"}])
        fragment = (f"{p} is a file, not a Deep Lake dataset (a dataset is a directory). If it holds training data, "
                    f"convert it with `sft ingest {p} --out DATASET_DIR` and use DATASET_DIR.")
    else:
        p.mkdir()
        if kind == "empty dir":
            fragment = (f"{p} is not a Deep Lake dataset (no _deeplake_log/ inside). Create one with "
                        f"`sft ingest FILE --out NEW_PATH`.")
        else:
            jsonl(p / "train.jsonl", [{"question": "q", "answer": "a"}])
            fragment = (f"{p} is not a Deep Lake dataset (no _deeplake_log/ inside) but holds 1 data file(s) "
                        f"(train.jsonl). Convert them with `sft ingest {p / 'train.jsonl'} --out NEW_PATH` and train "
                        f"on NEW_PATH.")
    r = sft(*train_args(tmp_path / "out", p))
    assert r.rc == 2 and fragment in r.err, r.err
    assert_nothing_left(tmp_path / "out")


def test_hub_id_without_network_fails_fast(sft, tmp_path, good_ds, no_model_load, monkeypatch):
    """No HF_HUB_OFFLINE (the config names a hub model, so sft does not set it) and no network: one failed DNS
    look-up, then the error naming the random-init architecture of the same shape."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_dns(*a, **k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    t0 = time.perf_counter()
    r = sft(*train_args(tmp_path / "out", good_ds, "model=facebook/opt-1.3b"))
    assert time.perf_counter() - t0 < 10
    assert r.rc == 2
    assert ("model.name: 'facebook/opt-1.3b' is a hub id that is not in the local cache, and the hub cannot be "
            "reached (no network). Pass a local model directory (model.name=/path/to/model), a GGUF file, or a "
            "random-init architecture of the same shape (model.name=arch:opt-1.3b).") in r.err
    assert_nothing_left(tmp_path / "out")
