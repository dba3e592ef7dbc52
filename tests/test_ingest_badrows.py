"""Bad rows at ingest (issue #15): every bad row of a run is reported at once (location, field, what is wrong; the
first 20 in full and a count of the rest) and nothing is written; ``--on-bad-row skip`` writes the good rows and
reports how many were skipped and where. Runs the real CLI in this process (argument parsing, exit status 2)."""

from __future__ import annotations

import glob
import json
import os

import deeplake
import pytest

from sft.data.ingest import ingest
from sft.errors import IngestError


def _jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def _nothing_at(out) -> None:
    out = str(out)
    assert not os.path.exists(out), f"{out} was written"
    assert glob.glob(out + ".tmp-*") == []


def _mixed(tmp_path) -> str:
    """Lines 1, 3, 6 good; 2 broken JSON; 4 missing 'answer'; 5 a number for the question."""
    return _jsonl(tmp_path / "mixed.jsonl", [
        {"question": "q1", "answer": "a1"},
        '{"question": "q2", "answer": ',
        {"question": "q3", "answer": "a3"},
        {"question": "q4", "output": "a4"},
        {"question": 5, "answer": "a5"},
        {"question": "q6", "answer": "a6"},
    ])


def test_every_bad_row_is_reported_in_one_run_and_nothing_is_written(sft, tmp_path):
    src = _mixed(tmp_path)
    rc, out, err = sft("ingest", src, "--out", tmp_path / "ds")
    assert rc == 2
    assert f"3 bad rows in {src}; nothing was written to {tmp_path / 'ds'}" in err, err
    assert f"{src} line 2: invalid JSON (Expecting value" in err
    assert f"{src} line 4: missing field 'answer' for answer (the record has: question, output)" in err
    assert f"{src} line 5: field 'question' (question) must be text, got int 5" in err
    assert "pass --on-bad-row skip to write the 3 good rows" in err
    for good in (1, 3, 6):
        assert f"line {good}:" not in err
    _nothing_at(tmp_path / "ds")


def test_skip_writes_the_good_rows_and_names_the_skipped_lines(sft, tmp_path):
    src = _mixed(tmp_path)
    rc, out, err = sft("ingest", src, "--out", tmp_path / "ds", "--on-bad-row", "skip")
    assert rc == 0, err
    assert f"skipped 3 bad rows: {os.path.basename(src)} lines 2, 4, 5" in out, out
    assert "line 4: missing field 'answer'" in out  # the reasons are shown too
    ds = deeplake.open_read_only(str(tmp_path / "ds"))
    assert list(ds["question"][0:len(ds)]) == ["q1", "q3", "q6"]
    assert list(ds["answer"][0:len(ds)]) == ["a1", "a3", "a6"]
    report = ingest([src], str(tmp_path / "ds2"), on_bad_row="skip", progress=False)
    assert report.total_rows == 3 and report.skipped_rows == 3
    assert report.skipped_locations == {src: [2, 4, 5]}


def test_first_20_in_full_then_a_count(sft, tmp_path):
    records = []
    for i in range(1, 31):
        records.append({"question": f"q{i}", "answer": "a"} if i % 3 == 0 else {"question": f"q{i}", "answer": i})
    bad = [i for i in range(1, 31) if i % 3]  # lines 1..30: 20 bad rows
    assert len(bad) == 20
    records += [{"question": "q", "answer": None}] * 5  # lines 31..35: 5 more bad rows
    src = _jsonl(tmp_path / "many.jsonl", records)
    rc, out, err = sft("ingest", src, "--out", tmp_path / "ds")
    assert rc == 2
    assert f"25 bad rows in {src}" in err
    shown = [line for line in err.splitlines() if line.strip().startswith(f"{src} line")]
    assert [int(s.split(" line ")[1].split(":")[0]) for s in shown] == bad  # the first 20, in file order
    assert "... and 5 more bad rows (lines 31-35)" in err
    _nothing_at(tmp_path / "ds")


def test_bad_rows_across_files_and_an_empty_file_are_reported_together(sft, tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}, {"question": "", "answer": "a"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    b = _jsonl(tmp_path / "b.jsonl", ["[1, 2]", {"question": "q", "answer": "a"}])
    rc, out, err = sft("ingest", a, empty, b, "--out", tmp_path / "ds")
    assert rc == 2
    assert "3 problems in the input" in err, err
    assert f"{a} line 2: field 'question' (question) is empty" in err
    assert f"{empty}: no rows (the file holds no records); remove it from the inputs" in err
    assert f"{b} line 1: expected an object with fields, got list [1, 2]" in err
    _nothing_at(tmp_path / "ds")
    # skip does not hide an empty input (a wrong file is not a bad row)
    rc, out, err = sft("ingest", a, empty, b, "--out", tmp_path / "ds", "--on-bad-row", "skip")
    assert rc == 2 and f"{empty}: no rows" in err
    _nothing_at(tmp_path / "ds")


def test_skip_with_only_bad_rows_writes_nothing(tmp_path):
    src = _jsonl(tmp_path / "all_bad.jsonl", ["{", {"question": 1, "answer": "a"}])
    with pytest.raises(IngestError, match=r"every row of the input is bad \(2 bad rows\); nothing was written"):
        ingest([src], str(tmp_path / "ds"), on_bad_row="skip", progress=False)
    _nothing_at(tmp_path / "ds")


def test_on_bad_row_is_checked_before_any_work(tmp_path):
    src = _jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(IngestError, match="on_bad_row: 'ignore' is not a policy; use fail or skip"):
        ingest([src], str(tmp_path / "ds"), on_bad_row="ignore", progress=False)
    _nothing_at(tmp_path / "ds")
