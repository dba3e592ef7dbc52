"""The generated demo task: deterministic, disjoint splits, a real rule, strict matching."""

import datetime as dt
import re

from sft.demo import exact_match, generate_examples, ledger_format


def test_rows_follow_the_rule():
    for row in generate_examples(200, seed=1, split="train"):
        iso = re.search(r"\d{4}-\d{2}-\d{2}", row["question"]).group(0)
        assert row["answer"] == ledger_format(dt.date.fromisoformat(iso))
        assert re.fullmatch(r"\d{2}\.[A-Z]{3}\.\d{4}", row["answer"])
        assert row["source"] == "demo"


def test_train_and_test_are_disjoint_and_deterministic():
    train = generate_examples(5000, seed=3, split="train")
    test = generate_examples(1000, seed=3, split="test")
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert len({r["question"] for r in train}) == 5000  # distinct inputs
    assert generate_examples(50, seed=3, split="test") == generate_examples(50, seed=3, split="test")
    assert generate_examples(50, seed=4, split="test") != generate_examples(50, seed=3, split="test")
    # other seeds never cross the split either
    assert not {r["question"] for r in generate_examples(2000, seed=9, split="train")} & {r["question"] for r in test}


def test_exact_match_is_strict_on_format():
    assert exact_match(" 15.MAR.2024\nmore text", "15.MAR.2024")
    assert not exact_match("15.Mar.2024", "15.MAR.2024")
    assert not exact_match("15 MAR 2024", "15.MAR.2024")
    assert not exact_match("", "15.MAR.2024")
