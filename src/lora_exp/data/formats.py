"""Record formats: detect them, and turn each record into a normalized example.

Normalized examples are ``{"messages": [{"role", "content"}, ...]}`` (rendered through the chat
template, loss on assistant turns) or ``{"text": ...}`` (continued pre-training, loss everywhere).

Formats:
    ``chat``: a list of messages (``role``/``content``, or ShareGPT ``from``/``value``), multi-turn.
    ``alpaca``: ``instruction``, optional ``input``, ``output``.
    ``prompt_response``: any schema through ``data.fields.prompt`` / ``data.fields.response``.
    ``text``: plain text in ``data.fields.text``.
    ``auto``: detected from the first record's fields, and logged.

Values that are not strings are rendered as JSON, never as Python's repr: a JSON object or list
(a structured response such as ``{"name": "Ana", "ok": true}``) becomes
``json.dumps(value, ensure_ascii=False)``, i.e. ``{"name": "Ana", "ok": true}``, with its keys in
the order the file wrote them (deterministic, and the order the model is meant to learn; a data set
that wants sorted keys sorts them itself), non-ASCII text as itself rather than ``\\u`` escapes,
and ``true`` / ``false`` / numbers as JSON writes them. ``python -m lora_exp.data.preview`` shows
the rendered text exactly as it is trained.

Chat message content may also be a list of parts, as in the OpenAI format
(``[{"type": "text", "text": "..."}, ...]``): the text parts are joined with a newline (as vLLM
does when it serves a text-only model); any other part type (``image_url``, ``input_audio``, ...)
is refused with the file, line and type, since a text model cannot be trained on it.

Chat turns are checked: a conversation with no assistant turn is an error (nothing to learn); turns
out of the usual order (a system turn after the first, two turns of one role in a row, an assistant
turn before any user turn) are trained as written, with one warning per file naming the first one,
since many chat templates were written for strictly alternating turns.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lora_exp.data.sources import Record
from lora_exp.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("auto", "chat", "alpaca", "prompt_response", "text")
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
DEFAULT_FIELDS = {"prompt": "prompt", "response": "response", "system": None, "messages": "messages", "text": "text"}
# part types of a list-valued chat content that carry text (OpenAI chat, OpenAI responses API)
TEXT_PARTS = ("text", "input_text", "output_text")


def field_names(fields: Any) -> dict[str, Any]:
    """``data.fields`` merged over the defaults, as a plain dict."""
    given = dict(fields or {})
    return {**DEFAULT_FIELDS, **{k: v for k, v in given.items() if v is not None}}


def detect(record: Record, fields: dict[str, Any]) -> str:
    """The format of ``record`` judged by its field names."""
    keys = record.data.keys()
    if fields["messages"] in keys or "conversations" in keys:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if fields["prompt"] in keys and fields["response"] in keys:
        return "prompt_response"
    if fields["text"] in keys:
        return "text"
    mapped = [k for k in ("prompt", "response") if fields[k] != DEFAULT_FIELDS[k]]
    if mapped:  # the user named their fields: say which of them the record lacks
        missing = [f"{fields[k]!r} (data.fields.{k})" for k in ("prompt", "response") if fields[k] not in keys]
        verb = "is" if len(missing) == 1 else "are"
        raise DataError(
            f"{record.where}: field{'s' if len(missing) > 1 else ''} {' and '.join(missing)} {verb} missing; "
            f"fields found: {_found(record)}"
        )
    raise DataError(
        f"{record.where}: cannot detect the data format from the fields {_found(record)}; set data.format "
        "(chat, alpaca, prompt_response, text) and data.fields.* to name your fields"
    )


def resolve(fmt: str, records: list[Record], fields: dict[str, Any]) -> str:
    """``fmt``, or the detected format when it is ``auto`` (said in the log)."""
    if fmt not in FORMATS:
        raise DataError(f"data.format={fmt!r}: unknown format; expected one of {', '.join(FORMATS)}")
    if fmt != "auto":
        return fmt
    detected = detect(records[0], fields)
    msg = f"data.format=auto: detected {detected!r} from the fields {_found(records[0])}"
    log.info(msg)
    print(f"[lora-exp] {msg}", flush=True)
    return detected


def convert_all(records: list[Record], fmt: str, fields: dict[str, Any]) -> list[dict]:
    """Every record as a normalized example; out-of-order chat turns warned about once per file.

    Pass every split read from one file together (train and held-out), so that a file gets one
    warning, naming its first out-of-order record.
    """
    examples, bad = [], {}
    for record in records:
        example = convert(record, fmt, fields)
        examples.append(example)
        problem = role_order_problem(example["messages"]) if "messages" in example else None
        if problem:
            count, first = bad.get(record.source or record.where, (0, None))
            if first is None or record.pos < first[0]:
                first = (record.pos, f"{record.where}: {problem}")
            bad[record.source or record.where] = (count + 1, first)
    for source, (count, (_pos, first)) in bad.items():
        log.warning(
            "%s: %d conversation%s with turns out of the usual order, trained as written (first: %s); "
            "templates written for alternating turns may render them oddly",
            source,
            count,
            "s" if count > 1 else "",
            first,
        )
    return examples


def convert(record: Record, fmt: str, fields: dict[str, Any]) -> dict:
    """One record as a normalized example; a missing field names the field and the fields found."""
    d = record.data
    if fmt == "text":
        return {"text": _get(record, fields["text"], "data.fields.text")}
    system = fields.get("system")
    messages = [{"role": "system", "content": _get(record, system, "data.fields.system")}] if system else []
    if fmt == "alpaca":
        prompt = _get(record, "instruction", "alpaca format")
        extra = d.get("input")
        extra = as_text(extra, record, "field 'input'") if extra is not None else ""
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": _get(record, "output", "")}]
    elif fmt == "prompt_response":
        messages += [
            {"role": "user", "content": _get(record, fields["prompt"], "data.fields.prompt")},
            {"role": "assistant", "content": _get(record, fields["response"], "data.fields.response")},
        ]
    elif fmt == "chat":
        messages = _chat(record, fields["messages"])
    else:
        raise DataError(f"data.format={fmt!r}: unknown format; expected one of {', '.join(FORMATS)}")
    return {"messages": messages}


def as_text(value: Any, record: Record, what: str) -> str:
    """A field's value as the text to train on: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        raise DataError(f"{record.where}: {what} holds binary data ({len(value)} bytes), not text")
    # default=str: values JSON has no type for (a Parquet timestamp) are written as their text
    return json.dumps(value, ensure_ascii=False, default=str)


def role_order_problem(messages: list[dict]) -> str | None:
    """What is out of the usual order in a conversation (system first, then user/assistant alternating)."""
    previous = None
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and i > 0:
            return f"message {i} is a system turn after the first turn"
        if role == "assistant" and previous in (None, "system"):
            return f"message {i} is an assistant turn before any user turn"
        if role == previous and role != "system":
            return f"message {i} is a second {role} turn in a row"
        previous = role
    return None


def _chat(record: Record, key: str) -> list[dict]:
    d = record.data
    if key not in d and "conversations" in d:
        key = "conversations"
    turns = d.get(key)
    if turns is None:
        raise DataError(f"{record.where}: missing field {key!r} (data.fields.messages); fields found: {_found(record)}")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{record.where}: field {key!r} must be a non-empty list of messages")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{record.where}: message {i} is not an object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if role not in ROLES or content is None:
            raise DataError(
                f"{record.where}: message {i} needs a role ({', '.join(sorted(set(ROLES.values())))}) and a content; "
                f"found {sorted(turn)} with role={role!r}"
            )
        messages.append({"role": ROLES[role], "content": _content(record, content, i)})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{record.where}: the conversation has no assistant turn, so nothing to learn from")
    return messages


def _content(record: Record, content: Any, i: int) -> str:
    """A message's content as text: a list is OpenAI-style parts, whose text parts are joined."""
    if not isinstance(content, list):
        return as_text(content, record, f"message {i} content")
    texts = []
    for j, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS and isinstance(part.get("text"), str):
            texts.append(part["text"])
            continue
        what = f"part type {kind!r}" if kind else f"a part that is not a text part ({_short(part)})"
        raise DataError(
            f"{record.where}: message {i} content part {j}: {what} is not supported; a text model trains on "
            f"text parts only ({', '.join(TEXT_PARTS)}): remove the other parts or the record"
        )
    return "\n".join(texts)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _get(record: Record, name: str, key: str) -> str:
    value = record.data.get(name)
    if value is None:
        what = f"field {name!r}" + (f" ({key})" if key else "")
        state = "is empty (null)" if name in record.data else "is missing"
        raise DataError(f"{record.where}: {what} {state}; fields found: {_found(record)}")
    return as_text(value, record, f"field {name!r}")


def _found(record: Record) -> str:
    return ", ".join(map(str, record.data)) or "(none)"
