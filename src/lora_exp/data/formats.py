"""Record formats: detect them, and turn each record into a normalized example.

Normalized examples are ``{"messages": [{"role", "content"}, ...]}`` (rendered through the chat
template, loss on assistant turns) or ``{"text": ...}`` (continued pre-training, loss everywhere).

Formats:
    ``chat``: a list of messages (``role``/``content``, or ShareGPT ``from``/``value``), multi-turn.
    ``alpaca``: ``instruction``, optional ``input``, ``output``.
    ``prompt_response``: any schema through ``data.fields.prompt`` / ``data.fields.response``.
    ``text``: plain text in ``data.fields.text``.
    ``auto``: detected from the first record's fields, and logged.
"""

from __future__ import annotations

import logging
from typing import Any

from lora_exp.data.sources import Record
from lora_exp.errors import DataError

log = logging.getLogger(__name__)

FORMATS = ("auto", "chat", "alpaca", "prompt_response", "text")
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}
DEFAULT_FIELDS = {"prompt": "prompt", "response": "response", "system": None, "messages": "messages", "text": "text"}


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
        if extra is not None and str(extra).strip():
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
        messages.append({"role": ROLES[role], "content": str(content)})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{record.where}: the conversation has no assistant turn, so nothing to learn from")
    return messages


def _get(record: Record, name: str, key: str) -> str:
    value = record.data.get(name)
    if value is None:
        what = f"field {name!r}" + (f" ({key})" if key else "")
        state = "is empty (null)" if name in record.data else "is missing"
        raise DataError(f"{record.where}: {what} {state}; fields found: {_found(record)}")
    return str(value)


def _found(record: Record) -> str:
    return ", ".join(map(str, record.data)) or "(none)"
