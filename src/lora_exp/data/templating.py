"""Render chat examples through the tokenizer's chat template into input ids and loss labels."""

from __future__ import annotations

from lora_exp.errors import DataError

IGNORE_INDEX = -100


def tokenize_chat(messages: list[dict], tokenizer, max_seq_len: int, train_on_prompt: bool = False) -> dict:
    """Tokenize one conversation; supervise every assistant turn through its end-of-turn token.

    The text is rendered once with the chat template and tokenized once (no special tokens added
    by the tokenizer, so a template that writes BOS never gets a second one). Each assistant turn's
    character span is found by rendering the conversation up to that turn with and without the
    reply, and tokens are labelled by their character offsets.

    Returns ``input_ids``, ``labels`` (``-100`` where unsupervised) and ``truncated``.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    eos = tokenizer.eos_token
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        end = upto.find(eos, start + len(message["content"]) - 1)
        end = len(upto) if end < 0 else end + len(eos)
        if not text.startswith(upto[:end]):
            raise DataError(
                "the chat template renders a conversation differently from its prefixes; "
                "cannot locate assistant replies"
            )
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for j, (a, _end) in enumerate(enc["offset_mapping"]):
        if train_on_prompt or any(s <= a < e for s, e in spans):
            labels[j] = ids[j]
    truncated = len(ids) > max_seq_len
    return {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len], "truncated": truncated}
