"""Rows ``{"question", "answer"}`` -> prompt text and token ids with labels.

Two templates:

``default``
    The seed project's ``"Question: {question}\\n\\nAnswer: {answer}"``. The prompt is
    ``"Question: {question}\\n\\nAnswer:"``; the answer part is ``" " + answer``.
``chat``
    The tokenizer's own chat template: one user message (the question), one assistant message (the answer).
    The prompt is the rendering of the user message with ``add_generation_prompt=True``; the answer part is
    the rest of the full rendering after that prompt.

Training and inference agree exactly: :func:`prompt_ids` is both the masked prefix of a training sample and what
generation / evaluation must feed the model (use it rather than re-tokenizing :func:`prompt_text`, which for a
tokenizer that adds BOS *and* a chat template that writes BOS itself would give a different sequence).

Token ids of one sample are ``prompt_ids + answer_ids`` with **no trailing EOS**: the packer
(:mod:`sft.data.packing`) writes exactly one EOS after every sample, and that EOS is always a label.

Special tokens
--------------
* BOS (default template): the prompt gets the tokenizer's own leading special tokens, i.e. what
  ``tokenizer(text)`` prepends (BOS for Llama/OPT-style tokenizers, nothing for SmolLM2/GPT-2-style ones).
  Tokens a tokenizer *appends* (an EOS-appending tokenizer) are never added: the packer owns the EOS.
* BOS (chat template): the template is authoritative, as in ``apply_chat_template(..., tokenize=True)``: the
  rendered text is tokenized with ``add_special_tokens=False``; a template that wants BOS writes it itself.
* Trailing end-of-turn (chat template): when the full rendering ends with the EOS token (optionally followed by
  whitespace), that EOS and the whitespace after it are removed from the answer part, because the packer appends
  EOS. For SmolLM2 (eos = ``<|im_end|>``, template ``...<|im_start|>assistant\\n{answer}<|im_end|>\\n``) a sample
  therefore ends ``{answer}<|im_end|>`` (the packer's EOS); the ``"\\n"`` after ``<|im_end|>`` is not trained, which
  is right because generation stops at ``<|im_end|>`` and never produces it. An end-of-turn token that is not the
  EOS token (e.g. Gemma's ``<end_of_turn>``) is kept as answer text, so the model learns it, and EOS follows it.

Conversations
-------------
A row with a ``"conversation"`` (JSON text ``[{"role", "content"}, ...]``: optional system turns, then user /
assistant turns alternating, ending with the assistant; see :mod:`sft.data.ingest.formats`) is formatted turn by turn.
``default`` renders consecutive pairs ``Question: {user}\n\nAnswer: {assistant}`` separated by a blank line, the
system turns (if any) opening the first question as in the row's ``question``. ``chat`` renders the whole
conversation with the tokenizer's template. With ``answer_only`` every assistant reply is trained and everything
else (system, user turns, the template's role headers, the ``Question:`` / ``Answer:`` scaffolding) is masked. In
the chat template an earlier reply keeps its end-of-turn token (the model learns to stop after each turn; the
whitespace after it is masked); the last reply ends like a single-turn answer (the packer's EOS).

Tokenization of the answer part
-------------------------------
The prompt is tokenized on its own, so the boundary is exact. The answer tokens are the continuation of the full
text's tokenization when that tokenization starts with the prompt's tokens (the usual case: byte-level BPE splits
at the space / newline there, and SentencePiece-style tokenizers then get their natural ``"▁answer"`` pieces);
otherwise (a merge across the boundary, e.g. an answer that starts with whitespace) the answer part is tokenized
alone and appended. Either way ``ids[:len(prompt_ids)] == prompt_ids``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from sft.errors import ConfigError, DataError

IGNORE_INDEX = -100

DEFAULT_TEMPLATE = "Question: {question}\n\nAnswer: {answer}"
_DEFAULT_PROMPT = "Question: {question}\n\nAnswer:"
_DEFAULT_ANSWER = " {answer}"
assert DEFAULT_TEMPLATE == _DEFAULT_PROMPT + _DEFAULT_ANSWER

TEMPLATES = ("default", "chat")


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added.

    Fast tokenizers go straight to the Rust backend's ``encode_batch_fast`` (no offsets; same ids as
    ``tokenizer(texts, add_special_tokens=False)``, ~1.3-1.7x faster on SmolLM2 here); others use ``__call__``.
    """
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if (
        backend is not None
        and hasattr(backend, "encode_batch_fast")
        and not getattr(tokenizer, "split_special_tokens", False)
        and not getattr(backend, "encode_special_tokens", False)
    ):
        return [enc.ids for enc in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _leading_special_ids(tokenizer) -> list[int]:
    """The ids ``tokenizer(text)`` puts in front of ``text`` (BOS where the tokenizer adds one)."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    n = len(plain)
    for i in range(len(full) - n + 1):
        if full[i : i + n] == plain:
            return list(full[:i])
    return []


def _as_text(value, field: str) -> str:
    if value is None:
        raise DataError(f"row field {field!r} is missing (None); every row needs a question and an answer string")
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)  # e.g. numpy.str_ from a columnar source


class Formatter:
    """Formats and tokenizes rows for one (tokenizer, template, answer_only) combination.

    Build once and reuse: it caches the tokenizer's leading special tokens and the EOS text.
    Calling it on lists tokenizes in batches (the fast path used by packing and by sft.data.lengths).
    """

    def __init__(self, tokenizer, template: str = "default", answer_only: bool = False):
        if template not in TEMPLATES:
            raise ConfigError(
                f"data.template: unknown template {template!r}; use one of {', '.join(TEMPLATES)}"
            )
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ConfigError(
                f"data.template: chat needs a tokenizer with a chat template, and {name} has none; "
                "use template: default (the 'Question: ...\\n\\nAnswer: ...' format)"
            )
        self.tokenizer = tokenizer
        self.template = template
        self.answer_only = bool(answer_only)
        self.eos_token = getattr(tokenizer, "eos_token", None)
        self.leading_ids = _leading_special_ids(tokenizer) if template == "default" else []

    # -- text -----------------------------------------------------------------------------------------------
    def prompt_text(self, question: str) -> str:
        question = _as_text(question, "question")
        if self.template == "default":
            return _DEFAULT_PROMPT.format(question=question)
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )

    def texts(self, question: str, answer: str) -> tuple[str, str]:
        """(prompt text, answer part) such that ``prompt + answer_part`` is the trained text (before EOS)."""
        question = _as_text(question, "question")
        answer = _as_text(answer, "answer")
        prompt = self.prompt_text(question)
        if self.template == "default":
            return prompt, _DEFAULT_ANSWER.format(answer=answer)
        full = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tokenize=False
        )
        if not full.startswith(prompt):
            raise ConfigError(
                "data.template: the tokenizer's chat template renders the conversation so that it does not start "
                "with its own generation prompt, so the answer cannot be separated from the prompt; "
                "use template: default"
            )
        rest = full[len(prompt) :]
        if self.eos_token:
            stripped = rest.rstrip()
            if stripped.endswith(self.eos_token):
                rest = stripped[: -len(self.eos_token)]
        return prompt, rest

    # -- ids ------------------------------------------------------------------------------------------------
    def prompt_ids(self, question: str) -> list[int]:
        return self.leading_ids + _encode(self.tokenizer, [self.prompt_text(question)])[0]

    def __call__(
        self, questions: Sequence[str], answers: Sequence[str]
    ) -> list[tuple[list[int], list[int]]]:
        """Tokenize a batch: one ``(input_ids, labels)`` per row, without trailing EOS."""
        if len(questions) != len(answers):
            raise ValueError("questions and answers differ in length")
        pairs = [self.texts(q, a) for q, a in zip(questions, answers)]
        prompts = [p for p, _ in pairs]
        p_ids = _encode(self.tokenizer, prompts)
        f_ids = _encode(self.tokenizer, [p + a for p, a in pairs])
        out = []
        fallback: list[int] = []
        answer_ids: list[list[int] | None] = []
        for i, (p, f) in enumerate(zip(p_ids, f_ids)):
            n = len(p)
            if f[:n] == p:
                answer_ids.append(f[n:])
            else:
                answer_ids.append(None)
                fallback.append(i)
        if fallback:
            for i, ids in zip(fallback, _encode(self.tokenizer, [pairs[i][1] for i in fallback])):
                answer_ids[i] = ids
        lead = self.leading_ids
        for p, a in zip(p_ids, answer_ids):
            prompt = lead + p
            ids = prompt + a
            if self.answer_only:
                labels = [IGNORE_INDEX] * len(prompt) + list(a)
            else:
                labels = list(ids)
            out.append((ids, labels))
        return out

    def rows(self, rows: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
        """Tokenize a batch of rows ``{"question", "answer", ...}`` (and ``"conversation"``, see above)."""
        plain = [i for i, r in enumerate(rows) if not r.get("conversation")]
        try:
            done = self([rows[i]["question"] for i in plain], [rows[i]["answer"] for i in plain])
        except KeyError as e:
            raise DataError(f"row has no {e.args[0]!r} field; rows need 'question' and 'answer'") from None
        if len(plain) == len(rows):
            return done
        out: list = [None] * len(rows)
        for i, pair in zip(plain, done):
            out[i] = pair
        for i, r in enumerate(rows):
            if out[i] is None:
                out[i] = self.conversation(_turns(r["conversation"]))
        return out

    # -- conversations --------------------------------------------------------------------------------------
    def segments(self, turns: list[dict]) -> list[tuple[str, bool]]:
        """``(text, is_assistant_reply)`` pieces whose concatenation is the trained text (before EOS)."""
        if self.template == "default":
            systems = [t["content"] for t in turns if t["role"] == "system"]
            dialog = [t for t in turns if t["role"] != "system"]
            out: list[tuple[str, bool]] = []
            for k in range(0, len(dialog), 2):
                question = dialog[k]["content"] if k or not systems else "\n\n".join([*systems, dialog[k]["content"]])
                out.append((("\n\n" if k else "") + _DEFAULT_PROMPT.format(question=question), False))
                out.append((_DEFAULT_ANSWER.format(answer=dialog[k + 1]["content"]), True))
            return out
        render = self.tokenizer.apply_chat_template
        full = render(turns, tokenize=False)
        out, pos = [], 0
        last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
        for i, t in enumerate(turns):
            if t["role"] != "assistant":
                continue
            prompt = render(turns[:i], add_generation_prompt=True, tokenize=False)
            upto = full if i == last else render(turns[: i + 1], tokenize=False)
            if not (full.startswith(prompt) and full.startswith(upto) and pos <= len(prompt) < len(upto)):
                raise ConfigError(
                    "data.template: the tokenizer's chat template does not render a conversation as its turns one "
                    "after the other (an earlier turn renders differently once later turns follow), so the "
                    "assistant replies cannot be separated; use template: default"
                )
            end = len(upto)
            if self.eos_token and upto.rstrip().endswith(self.eos_token):
                end = len(upto.rstrip()) - (len(self.eos_token) if i == last else 0)
            out += [(full[pos:len(prompt)], False), (full[len(prompt):end], True)]
            pos = end
        return out

    def conversation(self, turns: list[dict]) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of one conversation, without trailing EOS."""
        segments = [(t, trained) for t, trained in self.segments(turns) if t]
        texts = [t for t, _ in segments]
        # The same rule as for one answer: keep the full text's own tokenization when every boundary falls between
        # tokens (each prefix tokenizes to a prefix of the whole), else tokenize each piece alone.
        prefixes = _encode(self.tokenizer, ["".join(texts[: k + 1]) for k in range(len(texts))])
        full = prefixes[-1]
        if all(full[: len(p)] == p for p in prefixes):
            bounds = [0] + [len(p) for p in prefixes]
            pieces = [full[a:b] for a, b in zip(bounds, bounds[1:])]
        else:
            pieces = _encode(self.tokenizer, texts)
        ids = list(self.leading_ids)
        labels = [IGNORE_INDEX] * len(ids) if self.answer_only else list(ids)
        for piece, (_, trained) in zip(pieces, segments):
            ids += piece
            labels += piece if trained or not self.answer_only else [IGNORE_INDEX] * len(piece)
        return ids, labels


def _turns(value) -> list[dict]:
    """A row's conversation (JSON text, or already a list) -> turns; DataError when it is not one."""
    try:
        turns = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        turns = None
    ok = isinstance(turns, list) and all(
        isinstance(t, dict) and isinstance(t.get("content"), str) and t.get("role") in ("system", "user", "assistant")
        for t in turns)
    if ok:
        roles = [t["role"] for t in turns]
        dialog = roles[roles.count("system"):]  # system turns first, then user / assistant pairs
        ok = bool(dialog) and len(dialog) % 2 == 0 and dialog == ["user", "assistant"] * (len(dialog) // 2)
    if not ok:
        raise DataError(f"row field 'conversation' is not a conversation (JSON list of system, then alternating "
                        f"user / assistant turns ending with the assistant): {str(value)[:80]!r}; re-create the "
                        f"dataset with `sft ingest`")
    return turns


def prompt_text(tokenizer, question: str, template: str = "default") -> str:
    """The text the model sees before the answer (``"Question: {q}\\n\\nAnswer:"`` or the chat generation prompt)."""
    return Formatter(tokenizer, template).prompt_text(question)


def prompt_ids(tokenizer, question: str, template: str = "default") -> list[int]:
    """The prompt's token ids exactly as in training (BOS included where the default template gets one).

    Feed these to ``generate`` so inference sees the same sequence that training masked.
    """
    return Formatter(tokenizer, template).prompt_ids(question)


def tokenize_example(
    tokenizer, question: str, answer: str, template: str = "default", answer_only: bool = False
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one row, without trailing EOS (the packer adds it).

    ``labels == input_ids``, except that with ``answer_only`` the prompt tokens are ``-100``.
    For many rows build one :class:`Formatter` and call it on lists (batched, much faster).
    """
    return Formatter(tokenizer, template, answer_only)([question], [answer])[0]
