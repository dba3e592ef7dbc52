"""sft.data.formatting: templates, prompt/answer boundary, answer-only labels, BOS / EOS handling."""


import pytest

from sft.data.formatting import (
    DEFAULT_TEMPLATE,
    IGNORE_INDEX,
    Formatter,
    prompt_ids,
    prompt_text,
    tokenize_example,
)
from sft.errors import ConfigError, DataError
from tests.helpers import make_word_tokenizer


def test_default_template_text(smollm2):
    assert DEFAULT_TEMPLATE == "Question: {question}\n\nAnswer: {answer}"
    assert prompt_text(smollm2, "What is 2+2?") == "Question: What is 2+2?\n\nAnswer:"
    # braces in the data are data, not format fields
    assert prompt_text(smollm2, "a {b} c") == "Question: a {b} c\n\nAnswer:"


def test_default_template_ids_equal_full_text_tokenization(smollm2):
    q, a = "What is the capital of France?", "The capital of France is Paris."
    ids, labels = tokenize_example(smollm2, q, a)
    full = smollm2(DEFAULT_TEMPLATE.format(question=q, answer=a))["input_ids"]
    assert ids == full  # SmolLM2 adds no BOS; boundary split matches the natural tokenization
    assert labels == ids
    assert ids[-1] != smollm2.eos_token_id  # no trailing EOS: the packer adds it


def test_default_answer_only_masks_exactly_the_prompt(smollm2):
    q, a = "What is the capital of France?", "The capital of France is Paris."
    ids, labels = tokenize_example(smollm2, q, a, answer_only=True)
    p = prompt_ids(smollm2, q)
    assert ids[: len(p)] == p
    assert labels[: len(p)] == [IGNORE_INDEX] * len(p)
    assert labels[len(p) :] == ids[len(p) :]
    assert IGNORE_INDEX not in labels[len(p) :]
    assert smollm2.decode(ids[: len(p)]) == prompt_text(smollm2, q)
    assert smollm2.decode(labels[len(p) :]) == " " + a


def test_chat_prompt_matches_apply_chat_template(smollm2):
    q = "What is 2+2?"
    msgs = [{"role": "user", "content": q}]
    assert prompt_text(smollm2, q, "chat") == smollm2.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    )
    # transformers 5: apply_chat_template(tokenize=True) returns a BatchEncoding, not a list
    expected = smollm2.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt_ids(smollm2, q, "chat") == list(expected)


def test_chat_answer_only_on_smollm2(smollm2):
    q, a = "What is 2+2?", "2 + 2 = 4."
    ids, labels = tokenize_example(smollm2, q, a, template="chat", answer_only=True)
    p = prompt_ids(smollm2, q, "chat")
    assert ids[: len(p)] == p
    assert labels[: len(p)] == [IGNORE_INDEX] * len(p)
    # the answer part is the answer only: the template's trailing "<|im_end|>\n" is stripped (the packer adds EOS)
    assert smollm2.decode(labels[len(p) :]) == a
    assert smollm2.eos_token_id not in ids[len(p) :]
    full = smollm2.apply_chat_template(
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
    )
    assert full.endswith(smollm2.eos_token + "\n")
    assert smollm2.decode(ids) + smollm2.eos_token + "\n" == full


def test_chat_without_template_names_the_fix():
    tok = make_word_tokenizer(add_bos=False)
    with pytest.raises(ConfigError, match="template: default"):
        tokenize_example(tok, "what is 4", "yes", template="chat")
    with pytest.raises(ConfigError, match="unknown template"):
        Formatter(tok, "alpaca")


def test_bos_tokenizer_gets_bos_at_sample_start():
    tok = make_word_tokenizer(add_bos=True)
    ids, labels = tokenize_example(tok, "what is 4", "yes", answer_only=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids == tok("Question: what is 4\n\nAnswer: yes")["input_ids"]
    assert labels[0] == IGNORE_INDEX  # BOS is part of the prompt
    assert [x for x in labels if x != IGNORE_INDEX] == tok("yes", add_special_tokens=False)["input_ids"]
    assert prompt_ids(tok, "what is 4")[0] == tok.bos_token_id
    # a tokenizer without BOS gets none
    plain = make_word_tokenizer(add_bos=False)
    assert tokenize_example(plain, "what is 4", "yes")[0][0] != plain.bos_token_id


CHAT_WITH_BOS = (
    "{{ bos_token }}{% for m in messages %}{{ '<user> ' if m['role'] == 'user' else '<bot> ' }}"
    "{{ m['content'] }} {{ eos_token }} {% endfor %}{% if add_generation_prompt %}<bot> {% endif %}"
)
CHAT_EOT = (
    "{% for m in messages %}{{ '<user> ' if m['role'] == 'user' else '<bot> ' }}"
    "{{ m['content'] }} <eot> {% endfor %}{% if add_generation_prompt %}<bot> {% endif %}"
)


def test_chat_template_with_bos_is_authoritative():
    tok = make_word_tokenizer(add_bos=True, chat_template=CHAT_WITH_BOS)
    ids, labels = tokenize_example(tok, "what is 4", "yes no", template="chat", answer_only=True)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # not doubled
    assert ids[-1] != tok.eos_token_id  # template's trailing EOS stripped: the packer adds it
    assert tok.decode([x for x in labels if x != IGNORE_INDEX]) == "yes no"


def test_chat_end_of_turn_that_is_not_eos_is_trained():
    tok = make_word_tokenizer(add_bos=False, chat_template=CHAT_EOT)
    ids, labels = tokenize_example(tok, "what is 4", "yes", template="chat", answer_only=True)
    assert tok.convert_ids_to_tokens([x for x in labels if x != IGNORE_INDEX]) == ["yes", "<eot>"]


def test_boundary_is_exact_when_answer_starts_with_whitespace(smollm2):
    for a in ["\n\nindented", "  two spaces", "", "x"]:
        for template in ("default", "chat"):
            ids, labels = tokenize_example(smollm2, "Q?", a, template=template, answer_only=True)
            p = prompt_ids(smollm2, "Q?", template)
            assert ids[: len(p)] == p
            assert labels.count(IGNORE_INDEX) == len(p)
            expected = (" " + a) if template == "default" else a
            assert smollm2.decode(ids[len(p) :]) == expected


def test_batch_formatter_equals_single_examples(smollm2):
    rows = [{"question": f"Question number {i}?", "answer": "yes " * i} for i in range(6)]
    for template in ("default", "chat"):
        fmt = Formatter(smollm2, template, answer_only=True)
        batch = fmt.rows(rows)
        single = [tokenize_example(smollm2, r["question"], r["answer"], template, True) for r in rows]
        assert batch == single


def test_bad_rows_raise_data_error(smollm2):
    with pytest.raises(DataError, match="answer"):
        tokenize_example(smollm2, "q", None)
    with pytest.raises(DataError, match="'answer'"):
        Formatter(smollm2).rows([{"question": "q"}])
