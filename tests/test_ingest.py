"""sft.data.ingest: every format round-trips through Deep Lake; bad input fails with a precise message and no output."""

from __future__ import annotations

import csv
import glob
import json
import os
import re

import deeplake
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sft.data.ingest import IngestReport, ingest, write_dataset
from sft.data.source import ShardedSource
from sft.errors import IngestError

# Values that trip naive writers: commas, quotes, newlines, tabs-free unicode, leading spaces.
ROWS = [
    {"question": f"question {i}, with \"quotes\"" + ("\nand a second line" if i % 5 == 0 else ""),
     "answer": f" answer {i} — ünïcødé ✓"}
    for i in range(23)
]


def _read(out: str) -> tuple[list[dict[str, str]], list[str]]:
    """(question/answer rows in dataset order via ShardedSource, source column)."""
    rows = list(ShardedSource(out, shuffle=False, read_batch=7).iter_rows())
    ds = deeplake.open_read_only(out)
    return rows, list(ds["source"][0:len(ds)])


def _assert_clean(out) -> None:
    out = str(out)
    assert not os.path.exists(out), f"{out} was left behind"
    assert glob.glob(out + ".tmp-*") == [] and glob.glob(out + ".old-*") == []


def _jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def _csv(path, header, records, delimiter=",") -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(records)
    return str(path)


def _fail(tmp_path, inputs, fragment: str, **kw) -> str:
    """Ingest must raise IngestError containing ``fragment`` and leave no output; returns the message."""
    out = tmp_path / "out"
    with pytest.raises(IngestError) as ei:
        ingest([str(p) for p in inputs], str(out), progress=False, **kw)
    msg = str(ei.value)
    assert fragment in msg, msg
    _assert_clean(out)
    return msg


# ---------------------------------------------------------------------------------------------- round trips


def test_jsonl_round_trip(tmp_path):
    src = _jsonl(tmp_path / "train.jsonl", ROWS)
    with open(src, "a") as f:
        f.write("\n   \n")  # trailing blank lines are not records
    out = str(tmp_path / "ds")
    report = ingest([src], out, progress=False)
    assert report == IngestReport(out=out, total_rows=23, rows_per_file={src: 23})
    rows, sources = _read(out)
    assert rows == ROWS
    assert sources == ["train.jsonl"] * 23
    assert glob.glob(out + ".tmp-*") == []


def test_json_list_and_json_lines(tmp_path):
    lst = tmp_path / "list.json"
    lst.write_text(json.dumps(ROWS[:10], indent=2), encoding="utf-8")
    lines = _jsonl(tmp_path / "lines.json", ROWS[10:])  # ".json" that is really JSON lines
    out = str(tmp_path / "ds")
    report = ingest([str(lst), lines], out, progress=False)
    assert report.rows_per_file == {str(lst): 10, lines: 13}
    rows, sources = _read(out)
    assert rows == ROWS and sources == ["list.json"] * 10 + ["lines.json"] * 13


@pytest.mark.parametrize("ext,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_tsv_round_trip(tmp_path, ext, delimiter):
    src = _csv(tmp_path / f"data{ext}", ["id", "question", "answer"],
               [[i, r["question"], r["answer"]] for i, r in enumerate(ROWS)], delimiter)
    out = str(tmp_path / "ds")
    assert ingest([src], out, progress=False).total_rows == 23
    rows, sources = _read(out)
    assert rows == ROWS and set(sources) == {f"data{ext}"}


def test_csv_bom_and_long_field(tmp_path):
    long_answer = "x" * 300_000  # beyond csv's default 128 KiB field limit
    p = tmp_path / "bom.csv"
    with open(p, "w", encoding="utf-8-sig", newline="") as f:
        csv.writer(f).writerows([["question", "answer"], ["q", long_answer]])
    out = str(tmp_path / "ds")
    ingest([str(p)], out, progress=False)
    assert _read(out)[0] == [{"question": "q", "answer": long_answer}]


def test_parquet_round_trip_in_batches(tmp_path):
    n = 2500  # > READ_BATCH and several row groups
    table = pa.table({"question": [f"q{i}" for i in range(n)], "answer": [f"a{i}" for i in range(n)],
                      "extra": list(range(n))})
    src = str(tmp_path / "d.parquet")
    pq.write_table(table, src, row_group_size=700)
    out = str(tmp_path / "ds")
    assert ingest([src], out, progress=False).total_rows == n
    rows, _ = _read(out)
    assert rows == [{"question": f"q{i}", "answer": f"a{i}"} for i in range(n)]


def test_hf_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    single = tmp_path / "hf_single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    dd = tmp_path / "hf_dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(ROWS[:20]),
        "test": datasets.Dataset.from_list(ROWS[20:]),
    }).save_to_disk(str(dd))

    out = str(tmp_path / "a")
    ingest([str(single)], out, progress=False)
    rows, sources = _read(out)
    assert rows == ROWS and set(sources) == {"hf_single"}

    ingest([str(dd)], str(tmp_path / "b"), progress=False)  # default split: train
    assert _read(str(tmp_path / "b"))[0] == ROWS[:20]
    ingest([str(dd)], str(tmp_path / "c"), split="test", progress=False)
    assert _read(str(tmp_path / "c"))[0] == ROWS[20:]

    _fail(tmp_path, [dd], "has splits train, test and no 'validation'; choose one with --split train|test",
          split="validation")
    _fail(tmp_path, [single], "single Hugging Face Dataset without splits; drop --split test", split="test")


def test_forced_format(tmp_path):
    p = _jsonl(tmp_path / "data.txt", ROWS[:3])
    out = str(tmp_path / "ds")
    ingest([p], out, fmt="jsonl", progress=False)
    assert _read(out)[0] == ROWS[:3]


# ---------------------------------------------------------------------------------------------- mapping and chat


def test_mapping_with_source_field(tmp_path):
    recs = [{"instruction": r["question"], "output": r["answer"], "origin": f"set{i % 2}"} for i, r in enumerate(ROWS)]
    p = _jsonl(tmp_path / "alpaca.jsonl", recs)
    out = str(tmp_path / "ds")
    ingest([p], out, mapping={"question": "instruction", "answer": "output", "source": "origin"}, progress=False)
    rows, sources = _read(out)
    assert rows == ROWS and sources == [f"set{i % 2}" for i in range(23)]


def test_mapping_parquet_columns(tmp_path):
    src = str(tmp_path / "m.parquet")
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}), src)
    out = str(tmp_path / "ds")
    ingest([src], out, mapping={"question": "prompt", "answer": "completion"}, progress=False)
    assert _read(out)[0] == [{"question": "p1", "answer": "c1"}, {"question": "p2", "answer": "c2"}]


def test_unknown_mapping_target(tmp_path):
    p = _jsonl(tmp_path / "a.jsonl", ROWS[:1])
    _fail(tmp_path, [p], "unknown target 'prompt'", mapping={"prompt": "x"})


def _conv(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def test_chat_format(tmp_path):
    recs = [
        _conv(("user", "Hi?"), ("assistant", "Hello!")),
        _conv(("system", "Be terse."), ("user", "2+2?"), ("assistant", "4")),
        _conv(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),  # multi-turn: every turn kept
        {"question": "plain", "answer": "record"},  # mixed files are fine: detection is per record
    ]
    p = _jsonl(tmp_path / "chat.jsonl", recs)
    out = str(tmp_path / "ds")
    report = ingest([p], out, progress=False)
    assert report.conversations == 2 and "2 conversation(s) stored with every turn" in report.summary()
    rows = [{k: r[k] for k in ("question", "answer")} for r in _read(out)[0]]
    assert rows == [  # question/answer: the first exchange (what readers of the two-column schema see)
        {"question": "Hi?", "answer": "Hello!"},
        {"question": "Be terse.\n\n2+2?", "answer": "4"},
        {"question": "a", "answer": "b"},
        {"question": "plain", "answer": "record"},
    ]
    ds = deeplake.open_read_only(out)
    conv = ds["conversation"][0:4]
    assert conv[0] is None and conv[3] is None  # a plain exchange needs no conversation
    assert json.loads(conv[1]) == recs[1]["messages"] and json.loads(conv[2]) == recs[2]["messages"]


def test_chat_parquet_and_mapped_field(tmp_path):
    src = str(tmp_path / "c.parquet")
    conv = [[{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"}]]
    pq.write_table(pa.table({"conversation": conv}), src)
    out = str(tmp_path / "ds")
    ingest([src], out, mapping={"messages": "conversation"}, progress=False)
    assert _read(out)[0] == [{"question": "u1", "answer": "a1"}]


@pytest.mark.parametrize("record,fragment", [
    (_conv(("assistant", "hi"), ("user", "q")), "chat.jsonl line 1: messages[0] has role 'assistant' before any user"),
    (_conv(("system", "s"), ("user", "q")), "messages[1] (the first user message) has no assistant reply"),
    (_conv(("user", "q"), ("user", "q2")), "messages[1] has role 'user'; expected the assistant's reply"),
    (_conv(("system", "s")), "field 'messages' has no user message"),
    ({"messages": []}, "field 'messages' must be a non-empty list"),
    ({"messages": [{"content": "x"}]}, "messages[0] must be an object with a string \"role\""),
    (_conv(("user", "q"), ("assistant", "")), "field 'messages[1].content' (answer) is empty"),
    (_conv(("user", 5), ("assistant", "a")), "field 'messages[0].content' (question) must be text, got int 5"),
])
def test_chat_errors(tmp_path, record, fragment):
    _fail(tmp_path, [_jsonl(tmp_path / "chat.jsonl", [record])], fragment)


# ---------------------------------------------------------------------------------------------- bad input


def test_invalid_json_line(tmp_path):
    p = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], '{"question": "q", "answer": '])
    _fail(tmp_path, [p], "bad.jsonl line 3: invalid JSON")


def test_missing_field_lists_fields_and_suggests_map(tmp_path):
    p = _jsonl(tmp_path / "other.jsonl", [{"prompt": "i", "response": "o"}])
    msg = _fail(tmp_path, [p], "other.jsonl line 1: missing field 'question' for question")
    assert "(the record has: prompt, response)" in msg and "--map question=instruction answer=output" in msg
    p2 = _jsonl(tmp_path / "half.jsonl", [ROWS[0], {"question": "q", "output": "o"}])
    _fail(tmp_path, [p2], "half.jsonl line 2: missing field 'answer' for answer (the record has: question, output)")


@pytest.mark.parametrize("value,fragment", [
    (42, "must be text, got int 42"),
    (1.5, "must be text, got float 1.5"),
    (True, "must be text, got bool True"),
    (None, "must be text, got null/None"),
    ({"a": 1}, "must be text, got dict"),
    (["x"], "must be text, got list"),
    ("", "is empty"),
    ("   ", "is empty"),
])
def test_non_text_values(tmp_path, value, fragment):
    p = _jsonl(tmp_path / "v.jsonl", [ROWS[0], {"question": "q", "answer": value}])
    _fail(tmp_path, [p], f"v.jsonl line 2: field 'answer' (answer) {fragment}")


def test_empty_inputs(tmp_path):
    (tmp_path / "e.jsonl").write_text("")
    _fail(tmp_path, [tmp_path / "e.jsonl"], "e.jsonl: no rows")
    (tmp_path / "h.csv").write_text("question,answer\n")
    _fail(tmp_path, [tmp_path / "h.csv"], "h.csv: no rows")
    (tmp_path / "l.json").write_text("[]")
    _fail(tmp_path, [tmp_path / "l.json"], "l.json: no rows")


def test_unknown_extension_and_missing_input(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    msg = _fail(tmp_path, [tmp_path / "notes.txt"], "cannot tell the format of")
    assert ".jsonl" in msg and ".parquet" in msg and "--format" in msg
    _fail(tmp_path, [tmp_path / "absent.jsonl"], "absent.jsonl does not exist")
    _fail(tmp_path, [tmp_path / "notes.txt"], "--format xml: unknown format", fmt="xml")
    (tmp_path / "dir").mkdir()
    _fail(tmp_path, [tmp_path / "dir"], "is a directory but not a Hugging Face dataset")


def test_csv_errors_name_lines(tmp_path):
    p = _csv(tmp_path / "m.csv", ["prompt", "answer"], [["q", "a"]])
    _fail(tmp_path, [p], "m.csv line 1 (header): no column 'question' for question (columns: prompt, answer)")
    # The second record starts on line 4 because the first one's quoted value spans lines 2-3.
    p2 = tmp_path / "n.csv"
    p2.write_text('question,answer\n"multi\nline",a\nq,a,extra\n', encoding="utf-8")
    _fail(tmp_path, [p2], "n.csv line 4: 3 fields but the header has 2")
    p3 = tmp_path / "o.csv"
    p3.write_text('question,answer\n"multi\nline",a\n\nq,\n', encoding="utf-8")
    _fail(tmp_path, [p3], "o.csv line 5: field 'answer' (answer) is empty")


def test_parquet_errors(tmp_path):
    p = str(tmp_path / "n.parquet")
    pq.write_table(pa.table({"question": ["a", "b", "c"], "answer": ["x", None, "z"]}), p)
    _fail(tmp_path, [p], "n.parquet row 2: field 'answer' (answer) must be text, got null/None")
    p2 = str(tmp_path / "i.parquet")
    pq.write_table(pa.table({"question": ["a"], "answer": [7]}), p2)
    _fail(tmp_path, [p2], "i.parquet row 1: field 'answer' (answer) must be text, got int 7")
    p3 = str(tmp_path / "c.parquet")
    pq.write_table(pa.table({"q": ["a"], "a": ["b"]}), p3)
    _fail(tmp_path, [p3], "c.parquet schema: no column 'question' for question (columns: q, a)")
    bad = tmp_path / "junk.parquet"
    bad.write_text("not parquet")
    _fail(tmp_path, [bad], "junk.parquet: not a readable Parquet file")


def test_error_in_later_file_leaves_nothing(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", ROWS * 200)  # more than one write batch already appended
    bad = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"question": "q"}])
    _fail(tmp_path, [good, bad], "bad.jsonl line 2: missing field 'answer'")


def test_deeplake_dataset_as_input(tmp_path):
    ds = str(tmp_path / "already")
    write_dataset(ds, [{"question": "q", "answer": "a", "source": "s"}], progress=False)
    _fail(tmp_path, [ds], "is already a Deep Lake dataset; train on it directly")


# ---------------------------------------------------------------------------------------------- output handling


def test_existing_output_needs_overwrite(tmp_path):
    out = str(tmp_path / "ds")
    p1 = _jsonl(tmp_path / "one.jsonl", ROWS[:2])
    p2 = _jsonl(tmp_path / "two.jsonl", ROWS[2:5])
    ingest([p1], out, progress=False)
    with pytest.raises(IngestError, match="already exists; pass --overwrite to replace it"):
        ingest([p2], out, progress=False)
    assert _read(out)[0] == ROWS[:2]  # untouched
    ingest([p2], out, overwrite=True, progress=False)
    assert _read(out)[0] == ROWS[2:5]
    assert glob.glob(out + ".tmp-*") == glob.glob(out + ".old-*") == []
    # A failed overwrite keeps the previous dataset.
    bad = _jsonl(tmp_path / "bad.jsonl", ["{"])
    with pytest.raises(IngestError, match="invalid JSON"):
        ingest([bad], out, overwrite=True, progress=False)
    assert _read(out)[0] == ROWS[2:5]


def test_overwrite_refuses_non_dataset(tmp_path):
    victim = tmp_path / "home"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    p = _jsonl(tmp_path / "a.jsonl", ROWS[:1])
    with pytest.raises(IngestError, match="is not a Deep Lake dataset; --overwrite only replaces Deep Lake"):
        ingest([p], str(victim), overwrite=True, progress=False)
    assert (victim / "precious.txt").read_text() == "keep me"


def test_write_dataset_is_atomic_and_batched(tmp_path):
    out = tmp_path / "sub" / "ds"  # parent created on demand
    seen_during_write = []

    def rows():
        for i in range(10):
            if i == 5:
                seen_during_write.append((os.path.exists(out), glob.glob(str(out) + ".tmp-*")))
            yield {"question": f"q{i}", "answer": f"a{i}", "source": "gen"}

    assert write_dataset(str(out), rows(), progress=False, batch_size=3) == 10
    exists, tmps = seen_during_write[0]
    assert not exists and len(tmps) == 1 and re.search(r"\.tmp-\d+-[0-9a-f]+$", tmps[0])
    assert _read(str(out)) == ([{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)], ["gen"] * 10)
    assert glob.glob(str(out) + ".tmp-*") == []


def test_write_dataset_cleans_up_on_keyboard_interrupt(tmp_path):
    out = tmp_path / "ds"

    def rows():
        for i in range(5000):
            if i == 4500:
                raise KeyboardInterrupt
            yield {"question": "q", "answer": "a", "source": "s"}

    with pytest.raises(KeyboardInterrupt):
        write_dataset(str(out), rows(), progress=False)
    _assert_clean(out)


def test_write_dataset_validates_rows(tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(IngestError, match=r"row 2: field 'answer' must be a non-empty string, got null/None"):
        write_dataset(str(out), [{"question": "q", "answer": "a", "source": "s"},
                                 {"question": "q", "source": "s"}], progress=False)
    _assert_clean(out)
    with pytest.raises(IngestError, match="no rows to write"):
        write_dataset(str(out), [], progress=False)
    _assert_clean(out)
    with pytest.raises(IngestError, match="ingest writes local paths and s3:// object storage"):
        write_dataset("gs://bucket/ds", [], progress=False)  # s3:// is tested against a real server: test_s3.py


def test_progress_bar(tmp_path, capsys):
    p = _jsonl(tmp_path / "a.jsonl", ROWS)
    ingest([p], str(tmp_path / "quiet"), progress=False)
    assert capsys.readouterr().err == ""
    ingest([p], str(tmp_path / "loud"), progress=True)
    assert "23" in capsys.readouterr().err
