"""Record formats (issue #15): Alpaca, ShareGPT and multi-turn chat at ingest, --map joins, and conversations
formatted turn by turn in training with exact answer-only masks."""

from __future__ import annotations

import json

import deeplake
import pytest

from sft import cli
from sft.data.formatting import IGNORE_INDEX, Formatter
from sft.data.ingest import ingest
from sft.data.packing import PackedDataset
from sft.data.source import ShardedSource
from sft.errors import ConfigError, DataError, IngestError
from tests.helpers import load_smollm2, smollm2_cache_root


def _jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _columns(out: str) -> dict[str, list]:
    ds = deeplake.open_read_only(out)
    return {c.name: list(ds[c.name][0:len(ds)]) for c in ds.schema.columns}


THREE_TURNS = [
    {"role": "user", "content": "what is 4"}, {"role": "assistant", "content": "yes"},
    {"role": "user", "content": "hello"}, {"role": "assistant", "content": "no"},
    {"role": "user", "content": "a b"}, {"role": "assistant", "content": "c"},
]


# ---------------------------------------------------------------------------------------------- ingest


def test_alpaca_is_detected_and_its_input_joins_the_prompt(tmp_path):
    src = _jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue"},
        {"instruction": "Say hi.", "output": "Hi"},  # no input field at all
    ])
    out = str(tmp_path / "ds")
    report = ingest([src], out, progress=False)
    assert report.total_rows == 3 and report.ignored_fields == {}  # 'input' is read, not ignored
    cols = _columns(out)
    assert cols["question"] == ["Translate to French.\n\nGood morning", "Name a colour.", "Say hi."]
    assert cols["answer"] == ["Bonjour", "Blue", "Hi"]
    assert cols["source"] == ["alpaca.jsonl"] * 3
    assert "conversation" not in cols  # no conversations: the old three-column schema
    bad = _jsonl(tmp_path / "bad.jsonl", [{"instruction": "i", "input": 3, "output": "o"}])
    with pytest.raises(IngestError, match=r"bad.jsonl line 1: field 'input' \(question\) must be text, got int 3"):
        ingest([bad], str(tmp_path / "ds2"), progress=False)


def test_forced_record_format_and_map_join_from_the_cli(tmp_path, capsys):
    src = _jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add.", "input": "2 and 2", "output": "4", "question": "ignored here"},
    ])
    assert cli.main(["ingest", src, "--out", str(tmp_path / "forced"), "--format", "alpaca"]) == 0
    assert _columns(str(tmp_path / "forced"))["question"] == ["Add.\n\n2 and 2"]  # not the 'question' field
    assert cli.main(["ingest", src, "--out", str(tmp_path / "joined"), "--map", "question=instruction+input",
                     "answer=output"]) == 0
    assert _columns(str(tmp_path / "joined"))["question"] == ["Add.\n\n2 and 2"]
    capsys.readouterr()
    missing = _jsonl(tmp_path / "m.jsonl", [{"instruction": "i", "output": "o"}])
    assert cli.main(["ingest", missing, "--out", str(tmp_path / "m"), "--map", "question=instruction+inptu",
                     "answer=output"]) == 2
    assert "m.jsonl line 1: missing field 'inptu' for question" in capsys.readouterr().err


def test_sharegpt_and_chat_keep_every_turn(tmp_path):
    share = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "u1"},
                               {"from": "gpt", "value": "a1"}, {"from": "human", "value": "u2"},
                               {"from": "gpt", "value": "a2"}]}
    src = _jsonl(tmp_path / "mixed.jsonl", [share, {"messages": THREE_TURNS}])
    out = str(tmp_path / "ds")
    assert ingest([src], out, progress=False).conversations == 2
    cols = _columns(out)
    assert cols["question"] == ["Be brief.\n\nu1", "what is 4"] and cols["answer"] == ["a1", "yes"]
    assert json.loads(cols["conversation"][0]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"}]
    assert json.loads(cols["conversation"][1]) == THREE_TURNS
    bad = _jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "tool", "value": "x"}]},
                                          {"messages": THREE_TURNS[:3]}])
    with pytest.raises(IngestError) as e:
        ingest([bad], str(tmp_path / "ds2"), progress=False)
    assert "bad.jsonl line 1: conversations[0] is from 'tool'" in str(e.value)
    assert "bad.jsonl line 2: messages[2] (the last user message) has no assistant reply after it" in str(e.value)


# ---------------------------------------------------------------------------------------------- formatting


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "Question: Answer: what is 4 yes hello no a b c Be brief.".split()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_three_turn_conversation_masks_exactly_the_non_assistant_tokens():
    tok = _word_tokenizer()
    fmt = Formatter(tok, "default", answer_only=True)
    row = {"question": "what is 4", "answer": "yes", "conversation": json.dumps(THREE_TURNS)}
    ids, labels = fmt.rows([row])[0]
    words = "Question: what is 4 Answer: yes Question: hello Answer: no Question: a b Answer: c".split()
    assert tok.convert_ids_to_tokens(ids) == words
    trained = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
    assert trained == [5, 9, 14]  # yes, no, c: every assistant turn, nothing else
    assert [labels[i] for i in trained] == [ids[i] for i in trained]
    # the rendered text is consecutive Question/Answer pairs
    assert "".join(t for t, _ in fmt.segments(THREE_TURNS)) == (
        "Question: what is 4\n\nAnswer: yes\n\nQuestion: hello\n\nAnswer: no\n\nQuestion: a b\n\nAnswer: c")
    # without answer_only every token is a label; a plain row in the same batch is unchanged
    ids2, labels2 = Formatter(tok, "default").rows([row])[0]
    assert ids2 == ids and labels2 == ids
    plain = {"question": "what is 4", "answer": "yes"}
    assert fmt.rows([plain, row])[0] == fmt.rows([plain])[0] and fmt.rows([plain, row])[1] == (ids, labels)


def test_system_turn_opens_the_first_question_in_the_default_template():
    tok = _word_tokenizer()
    turns = [{"role": "system", "content": "Be brief."}] + THREE_TURNS[:2]
    ids, labels = Formatter(tok, "default", answer_only=True).conversation(turns)
    assert tok.convert_ids_to_tokens(ids) == "Question: Be brief. what is 4 Answer: yes".split()
    assert [i for i, x in enumerate(labels) if x != IGNORE_INDEX] == [7]


def test_chat_template_trains_every_assistant_turn_on_smollm2(request):
    tok = load_smollm2(smollm2_cache_root(request))
    ids, labels = Formatter(tok, "chat", answer_only=True).conversation(THREE_TURNS)
    full = tok.apply_chat_template(THREE_TURNS, tokenize=False)
    assert full.endswith("c<|im_end|>\n")
    assert tok.decode(ids) == full[: -len("<|im_end|>\n")]  # the packer's EOS ends the last reply
    spans, cur = [], []
    for i, x in enumerate(labels):
        if x != IGNORE_INDEX:
            cur.append(ids[i])
        elif cur:
            spans.append(cur)
            cur = []
    spans.append(cur)
    # earlier replies keep their end-of-turn token (the model learns to stop after each turn)
    assert [tok.decode(s) for s in spans] == ["yes<|im_end|>", "no<|im_end|>", "c"]


def test_bad_conversation_values_fail_clearly():
    fmt = Formatter(_word_tokenizer(), "default")
    with pytest.raises(DataError, match="row field 'conversation' is not a conversation"):
        fmt.rows([{"question": "q", "answer": "a", "conversation": '[{"role": "user", "content": "x"}]'}])
    with pytest.raises(DataError, match="not a conversation"):
        fmt.rows([{"question": "q", "answer": "a", "conversation": "{not json"}])
    tok = _word_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if loop.last %}{{ m['content'] }} {% else %}x {% endif %}"
                         "{% endfor %}")  # renders earlier turns differently once later turns follow
    with pytest.raises(ConfigError, match="use template: default"):
        Formatter(tok, "chat").conversation(THREE_TURNS)


def test_ingested_conversation_reaches_the_packer_with_its_masks(tmp_path):
    """JSONL -> ingest -> Deep Lake -> ShardedSource -> PackedDataset: the labels of the block are exactly the three
    assistant replies and the EOS."""
    tok = _word_tokenizer()
    src = _jsonl(tmp_path / "c.jsonl", [{"messages": THREE_TURNS}, {"question": "hello", "answer": "yes"}])
    out = str(tmp_path / "ds")
    ingest([src], out, progress=False)
    source = ShardedSource(out, shuffle=False)
    rows = list(source.iter_rows())
    assert rows[0]["conversation"] and rows[1] == {"question": "hello", "answer": "yes", "conversation": None}
    ds = PackedDataset(source.iter_rows, tok, "default", seq_length=21, answer_only=True)
    block = next(iter(ds))
    labels = block["labels"].tolist()
    trained = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
    # conversation: 15 tokens + EOS (0..15); then "Question: hello Answer: yes" + EOS (16..20)
    assert trained == [5, 9, 14, 15, 19, 20]
    assert tok.convert_ids_to_tokens([block["input_ids"][i].item() for i in trained]) == [
        "yes", "no", "c", "</s>", "yes", "</s>"]
