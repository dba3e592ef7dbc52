"""Record formats at ingest: one input record -> one row ``{"question", "answer", "source", "conversation"}``.

Formats (detected per record, in this order, unless ``--format`` names one for every record):

``qa``
    ``question`` / ``answer`` fields, or the fields ``--map`` names. A mapped field may be a join
    (``--map question=instruction+input``): the named fields' texts joined by a blank line; every named field must
    be present and be text, empty ones are left out, and the result must not be empty.
``chat``
    ``messages``: a list of ``{"role", "content"}`` with optional leading ``system`` (or ``developer``) messages,
    then ``user`` / ``assistant`` turns alternating, starting with ``user`` and ending with ``assistant``.
``sharegpt``
    ``conversations``: a list of ``{"from", "value"}`` with ``from`` = ``system`` / ``human`` / ``gpt`` (also
    ``user`` / ``assistant``); converted to the chat form, same rules.
``lima``
    ``conversations``: a list of plain strings, the turns alternating user / assistant and starting with the user
    (LIMA's own JSONL: ``{"conversations": ["<user>", "<assistant>", ...], "source": "stackexchange"}``, some
    rows multi-turn); converted to the chat form, same rules. A ``messages`` field (``--format chat``) may hold the
    same plain strings.
``alpaca``
    ``instruction``, optional ``input``, ``output``. The input is the context the instruction refers to, so it
    belongs to the prompt: question = instruction, a blank line, input (instruction alone when input is empty or
    absent, as in Alpaca's own two prompt variants); answer = output.

Storage of conversations (why the ``conversation`` column): a row keeps ``question`` and ``answer`` for every
format (question = the system messages and the first user message, answer = the first assistant reply), so every
reader of the two-column schema -- older sft versions, generation, accuracy evaluation -- still works on a new
dataset, and every old dataset (no ``conversation`` column) reads exactly as before. When the conversation holds
more than that (a second exchange, or a system message whose role a chat template should see) the whole
conversation is also stored, as JSON text ``[{"role", "content"}, ...]``, in an optional ``conversation`` text
column, and training formats it turn by turn (:mod:`sft.data.formatting`). Text rather than nested Deep Lake
types: one more column of the type every reader already handles, no schema migration, and a row's conversation
is read with the same column slice as its question.

Source: ``--map source=FIELD`` names the field; without it, a record's own ``source`` text is kept (LIMA's
``stackexchange``, ``wikihow``, ...), and the input's file name stands in where a record has none.

Mapping policy: ``--map question=`` / ``answer=`` describe ``qa`` records; a record read as another format (its
fields hold a conversation or Alpaca's names) while question or answer are mapped is an error naming the mapped
field, never a mapping silently ignored.

Text policy: question, answer, source and every turn's content must be ``str`` and not blank. Anything else
(numbers, bools, None/null, lists, dicts) is a bad row naming the field -- never silently ``str()``-ed, because a
number where text was expected almost always means a wrong ``--map``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sft.errors import IngestError

MAP_TARGETS = ("question", "answer", "source", "messages")
RECORD_FORMATS = ("qa", "chat", "sharegpt", "lima", "alpaca")
SYSTEM_ROLES = ("system", "developer")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
JOIN = "\n\n"  # between joined fields, and between system prompts and the first question


@dataclass(frozen=True)
class Fields:
    """Where a record's parts come from: target -> field names (more than one: a join)."""

    question: tuple[str, ...] = ("question",)
    answer: tuple[str, ...] = ("answer",)
    source: str | None = None  # None: the record's own "source" text, else the input's file name
    messages: str = "messages"
    record_format: str | None = None  # None: detect per record

    @property
    def maps_qa(self) -> bool:
        """True when ``--map`` named the question or answer field (qa records only)."""
        return self.question != ("question",) or self.answer != ("answer",)


def parse_fields(mapping: Mapping[str, str] | None, record_format: str | None = None) -> Fields:
    mapping = dict(mapping or {})
    kw: dict[str, Any] = {}
    for target, name in mapping.items():
        if target not in MAP_TARGETS:
            raise IngestError(f"--map {target}={name}: unknown target {target!r}; targets are {', '.join(MAP_TARGETS)}")
        if not isinstance(name, str) or not name:
            raise IngestError(f"--map {target}=...: the field name must be a non-empty string, got {name!r}")
        parts = tuple(name.split("+"))
        if any(not p for p in parts):
            raise IngestError(f"--map {target}={name}: a join names fields with '+' between them, e.g. "
                              f"--map question=instruction+input")
        if target in ("question", "answer"):
            kw[target] = parts
        elif len(parts) > 1:
            raise IngestError(f"--map {target}={name}: only question and answer can join fields")
        else:
            kw[target] = name
    if record_format is not None and record_format not in RECORD_FORMATS:
        raise IngestError(f"--format {record_format}: unknown record format; use {', '.join(RECORD_FORMATS)}")
    return Fields(**kw, record_format=record_format)


def describe(v: Any) -> str:
    if v is None:
        return "null/None"
    if isinstance(v, str):
        return "an empty string" if not v.strip() else repr(v[:40])
    r = repr(v)
    return f"{type(v).__name__} {r[:40] + '...' if len(r) > 40 else r}"


def text(v: Any, where: str, name: str, what: str) -> str:
    """Return ``v`` if it is non-blank text, else raise an IngestError naming where/field."""
    if isinstance(v, str) and v.strip():
        return v
    if isinstance(v, str):
        raise IngestError(
            f"{where}: field {name!r} ({what}) is empty. Every row needs a non-empty question and answer; "
            f"remove or fill the row."
        )
    raise IngestError(
        f"{where}: field {name!r} ({what}) must be text, got {describe(v)}. Only strings are ingested (numbers "
        f"and nulls are not converted); fix the value or --map {what}=FIELD to the right field."
    )


def missing(where: str, record: Mapping[str, Any], name: str, target: str) -> IngestError:
    have = ", ".join(map(str, record)) or "no fields"
    return IngestError(
        f"{where}: missing field {name!r} for {target} (the record has: {have}). Map your field names with "
        f"--map {target}=FIELD, e.g. --map question=instruction answer=output"
    )


def _joined(record: Mapping[str, Any], names: tuple[str, ...], where: str, target: str) -> str:
    if len(names) == 1:
        return text(record[names[0]], where, names[0], target)
    parts = []
    for name in names:
        if name not in record:
            raise missing(where, record, name, target)
        v = record[name]
        if not isinstance(v, str):
            text(v, where, name, target)  # raises: not text
        if v.strip():
            parts.append(v)
    if not parts:
        raise IngestError(f"{where}: fields {' + '.join(names)} ({target}) are all empty; remove or fill the row.")
    return JOIN.join(parts)


def _alpaca(record: Mapping[str, Any], where: str) -> tuple[str, str]:
    for name, target in (("instruction", "question"), ("output", "answer")):
        if name not in record:
            raise missing(where, record, name, target)
    instruction = text(record["instruction"], where, "instruction", "question")
    context = record.get("input")
    if context is not None and not isinstance(context, str):
        text(context, where, "input", "question")  # raises: not text
    answer = text(record["output"], where, "output", "answer")
    return (instruction + JOIN + context if context and context.strip() else instruction), answer


def _sharegpt(turns: Any, where: str, name: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not turns:
        raise IngestError(f"{where}: field {name!r} must be a non-empty list of {{\"from\", \"value\"}} objects, "
                          f"got {describe(turns)}")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, Mapping) or not isinstance(t.get("from"), str) or "value" not in t:
            raise IngestError(f"{where}: {name}[{i}] must be an object with a string \"from\" and a \"value\", "
                              f"got {describe(t)}")
        role = _SHAREGPT_ROLES.get(t["from"])
        if role is None:
            raise IngestError(f"{where}: {name}[{i}] is from {t['from']!r}; supported: "
                              f"{', '.join(_SHAREGPT_ROLES)} (tool and function turns are not)")
        out.append({"role": role, "content": t["value"]})
    return out


def _plain_turns(turns: list[str]) -> list[dict[str, Any]]:
    """LIMA's form: plain strings alternating user / assistant, starting with the user."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


def _is_plain_turns(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, str) for t in v)


def conversation(messages: Any, where: str, name: str) -> tuple[list[dict[str, str]], int]:
    """Validate a chat record's turns -> (normalised turns, index of the first user turn in them)."""
    if not isinstance(messages, list) or not messages:
        raise IngestError(
            f"{where}: field {name!r} must be a non-empty list of {{\"role\", \"content\"}} objects, "
            f"got {describe(messages)}"
        )
    turns: list[dict[str, str]] = []
    expect = None  # the role the next turn must have, once the first user turn was seen
    first_user = None
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise IngestError(
                f"{where}: {name}[{i}] must be an object with a string \"role\" and a \"content\", got {describe(m)}"
            )
        role, content = m["role"], m["content"]
        if expect is None and role in SYSTEM_ROLES:
            if content is not None and not isinstance(content, str):
                text(content, where, f"{name}[{i}].content", "system prompt")
            if content and content.strip():
                turns.append({"role": "system", "content": content})  # an empty system prompt adds nothing
            continue
        if role not in ("user", "assistant"):
            raise IngestError(f"{where}: {name}[{i}] has role {role!r}; after the first user message only user and "
                              f"assistant turns are supported (system messages go first)")
        if expect is None:
            if role != "user":
                raise IngestError(
                    f"{where}: {name}[{i}] has role {role!r} before any user message; a conversation must start "
                    f"with optional system messages and then a user message"
                )
            first_user = i
        elif role != expect:
            prev = "the assistant's reply to" if expect == "assistant" else "a user message after"
            raise IngestError(f"{where}: {name}[{i}] has role {role!r}; expected {prev} {name}[{i - 1}]")
        what = "question" if role == "user" else "answer"
        turns.append({"role": role, "content": text(content, where, f"{name}[{i}].content", what)})
        expect = "assistant" if role == "user" else "user"
    if first_user is None:
        raise IngestError(f"{where}: field {name!r} has no user message")
    if expect == "assistant":
        last = len(messages) - 1
        which = "the first user message" if last == first_user else "the last user message"
        raise IngestError(f"{where}: {name}[{last}] ({which}) has no assistant reply after it")
    return turns, next(i for i, t in enumerate(turns) if t["role"] == "user")


def _chat_row(turns: list[dict[str, str]], user: int) -> tuple[str, str, str | None]:
    systems = [t["content"] for t in turns[:user]]
    question = JOIN.join([*systems, turns[user]["content"]])
    keep = len(turns) > user + 2 or systems  # more than question/answer can say: store the whole conversation
    return question, turns[user + 1]["content"], json.dumps(turns, ensure_ascii=False) if keep else None


def detect(record: Mapping[str, Any], f: Fields) -> str:
    """The record format of one record (see the module docstring)."""
    if f.record_format is not None:
        return f.record_format
    if f.question[0] in record:
        return "qa"
    if f.messages in record:
        return "chat"
    if "conversations" in record:
        return "lima" if _is_plain_turns(record["conversations"]) else "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return "qa"  # reports the missing question field


class Converter:
    """Record -> row, with the field mapping, the formats and the text policy; counts stored conversations."""

    def __init__(self, fields: Fields):
        self.f = fields
        self.conversations = 0

    def __call__(self, record: Any, path: str, unit: str, n: int, default_source: str) -> dict[str, Any]:
        # Fast path for the common valid plain record: no location string is built unless something is wrong
        # (building "file line N" for every row cost ~15% of ingest time).
        f = self.f
        if type(record) is dict and len(f.question) == 1 and len(f.answer) == 1 and f.record_format in (None, "qa"):
            q = record.get(f.question[0])
            a = record.get(f.answer[0])
            s = record.get("source", default_source) if f.source is None else record.get(f.source)
            if (type(q) is str and type(a) is str and type(s) is str and q and a and s
                    and not q.isspace() and not a.isspace() and not s.isspace()):
                return {"question": q, "answer": a, "source": s, "conversation": None}
        return self.convert(record, f"{path} {unit} {n}", default_source)

    def convert(self, record: Any, where: str, default_source: str) -> dict[str, Any]:
        """The full rules, with error messages naming ``where``."""
        f = self.f
        if not isinstance(record, Mapping):
            raise IngestError(f"{where}: expected an object with fields, got {describe(record)}")
        kind = detect(record, f)
        if kind != "qa" and f.maps_qa:
            raise unused_map(where, record, f, kind)
        conv = None
        if kind == "qa":
            for names, target in ((f.question, "question"), (f.answer, "answer")):
                if names[0] not in record:
                    raise missing(where, record, names[0], target)
            q = _joined(record, f.question, where, "question")
            a = _joined(record, f.answer, where, "answer")
        elif kind == "alpaca":
            q, a = _alpaca(record, where)
        else:
            name = f.messages if kind == "chat" else "conversations"
            if name not in record:
                raise missing(where, record, name, "messages")
            raw = record[name]
            if _is_plain_turns(raw):  # LIMA's plain strings, under either field name
                raw = _plain_turns(raw)
            elif kind == "lima":
                raise IngestError(f"{where}: field {name!r} must be a non-empty list of strings (LIMA: user and "
                                  f"assistant turns alternating), got {describe(raw)}")
            elif kind == "sharegpt":
                raw = _sharegpt(raw, where, name)
            q, a, conv = _chat_row(*conversation(raw, where, name))
            self.conversations += conv is not None
        if f.source is None:  # the record's own source when it is text, else the file name
            own = record.get("source")
            s = own if isinstance(own, str) and own.strip() else default_source
        elif f.source in record:
            s = text(record[f.source], where, f.source, "source")
        else:
            raise missing(where, record, f.source, "source")
        return {"question": q, "answer": a, "source": s, "conversation": conv}


class MapError(IngestError):
    """A ``--map`` that does not fit the input: the whole ingest stops at the first record (not a bad row each)."""


def unused_map(where: str, record: Mapping[str, Any], f: Fields, kind: str) -> MapError:
    mapped = [f"{t}={'+'.join(n)}" for t, n in (("question", f.question), ("answer", f.answer))
              if n != (t,)]
    have = ", ".join(map(str, record)) or "no fields"
    absent = [n for t, names in (("question", f.question), ("answer", f.answer)) for n in names if n not in record]
    why = f"field {absent[0]!r} is not in the record" if absent else "question/answer maps apply to qa records only"
    return MapError(
        f"{where}: --map {' '.join(mapped)}: {why} (the record has: {have}), and the record reads as the {kind} "
        f"format, which --map question/answer does not apply to. Drop the --map (the {kind} format is detected by "
        f"itself) or name fields the record has"
    )


def needed(names: list[str], f: Fields) -> list[tuple[str, str]]:
    """(field, target) pairs a table with these column names is read from (columnar inputs: Parquet, HF)."""
    kind = f.record_format
    if kind is None:
        kind = detect(dict.fromkeys(names), f)
    if kind != "qa" and f.maps_qa:
        raise unused_map("columns", dict.fromkeys(names), f, kind)
    if kind == "qa":
        out = [(n, "question") for n in f.question] + [(n, "answer") for n in f.answer]
    elif kind == "alpaca":
        out = [("instruction", "question")] + ([("input", "question")] if "input" in names else [])
        out.append(("output", "answer"))
    else:
        out = [(f.messages if kind == "chat" else "conversations", "messages")]
    if f.source is not None:
        out.append((f.source, "source"))
    elif "source" in names:
        out.append(("source", "source"))  # the record's own source is kept
    return out


def extra_fields(names: list[str], f: Fields) -> list[str]:
    """Field names that are not read (the extra-columns policy: ignored, and named in the ingest summary)."""
    used = {name for name, _ in needed(names, f)}
    return [str(x) for x in names if x not in used]
