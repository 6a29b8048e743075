"""Data that is not plain text: JSON values, OpenAI-style content parts, non-UTF-8 bytes, turn order.

Each case goes through the data module as a run builds it (or the preview command), and checks the
exact tokens that are trained.
"""

from __future__ import annotations

import json
import logging

import pytest

from conftest import compose
from lora_exp.data.datamodule import InstructionDataModule
from lora_exp.data.templating import IGNORE_INDEX
from lora_exp.errors import DataError
from lora_exp.model.load import ensure_smollm2_folder, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(ensure_smollm2_folder()))


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """A fresh tokenized-data cache per test (every case tokenizes and warns for real); models shared."""
    from lora_exp.model.load import cache_root

    models = cache_root() / "models"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(models, target_is_directory=True)
    monkeypatch.setenv("LORA_EXP_CACHE", str(tmp_path / "cache"))


def _dm(tok, path, *overrides) -> InstructionDataModule:
    cfg = compose("data=jsonl", f"data.train_path={path}", f"data.val_path={path}", *overrides)
    dm = InstructionDataModule(cfg.data, tok, 0)
    dm.setup("fit")
    return dm


def _jsonl(path, records: list[dict]):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _supervised(tok, row: dict) -> str:
    return tok.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])


def _text(tok, row: dict) -> str:
    return tok.decode(row["input_ids"])


# ---- JSON values -----------------------------------------------------------------------------------
def test_a_json_object_response_is_trained_as_json_in_the_files_key_order(tmp_path, tok):
    response = {"name": "José", "ok": True, "x": None, "tags": ["a", "b"], "age": 31}
    path = _jsonl(tmp_path / "train.jsonl", [{"prompt": "Who?", "response": response}])
    dm = _dm(tok, path)
    expected = '{"name": "José", "ok": true, "x": null, "tags": ["a", "b"], "age": 31}'
    assert expected == json.dumps(response, ensure_ascii=False)
    assert _supervised(tok, dm.train_rows[0]) == expected + "<|im_end|>"
    assert "'name'" not in _text(tok, dm.train_rows[0]) and "True" not in _text(tok, dm.train_rows[0])
    # the order the file wrote is the order trained (not sorted): a file with other key order trains that order
    swapped = _jsonl(tmp_path / "swapped.jsonl", [{"prompt": "Who?", "response": {"b": 1, "a": 2}}])
    assert _supervised(tok, _dm(tok, swapped).train_rows[0]) == '{"b": 1, "a": 2}<|im_end|>'


@pytest.mark.parametrize(
    ("record", "fmt", "user", "reply"),
    [
        ({"prompt": ["x", 1, {"k": False}], "response": 7}, "prompt_response", '["x", 1, {"k": false}]', "7"),
        ({"instruction": "Sum", "input": [2, 3], "output": True}, "alpaca", "Sum\n\n[2, 3]", "true"),
        (
            {"messages": [{"role": "user", "content": {"q": "ü"}}, {"role": "assistant", "content": [1, 2]}]},
            "chat",
            None,
            None,
        ),
    ],
    ids=["prompt_response", "alpaca", "chat_object_content"],
)
def test_json_values_in_every_format_render_as_json(record, fmt, user, reply, tmp_path, tok):
    path = _jsonl(tmp_path / "train.jsonl", [record])
    if user is None:  # chat: a list content is a list of parts, and a number is not a part
        with pytest.raises(DataError, match=r"train.jsonl:1: message 1 content part 0: a part that is not a text"):
            _dm(tok, path)
        record["messages"][1]["content"] = {"a": [1, 2]}
        user, reply = '{"q": "ü"}', '{"a": [1, 2]}'
        path = _jsonl(path, [record])
    dm = _dm(tok, path)
    assert dm.format == fmt
    text = _text(tok, dm.train_rows[0])
    assert f"<|im_start|>user\n{user}<|im_end|>" in text
    assert _supervised(tok, dm.train_rows[0]) == reply + "<|im_end|>"


def test_preview_shows_the_json_exactly_as_trained(tmp_path, capsys):
    from lora_exp.data.preview import main

    path = _jsonl(tmp_path / "train.jsonl", [{"prompt": "Who?", "response": {"name": "Ana", "ok": True, "x": None}}])
    assert main(["data=jsonl", f"data.train_path={path}", f"data.val_path={path}"]) == 0
    out = capsys.readouterr().out
    assert '[[{"name": "Ana", "ok": true, "x": null}<|im_end|>]]' in out
    assert "{'name'" not in out


# ---- content parts ---------------------------------------------------------------------------------
def test_openai_content_parts_are_joined_as_text(tmp_path, tok):
    parts = [{"type": "text", "text": "Describe"}, "briefly", {"type": "input_text", "text": "please."}]
    record = {
        "messages": [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": [{"type": "text", "text": "Short."}, {"type": "text", "text": "Done."}]},
        ]
    }
    dm = _dm(tok, _jsonl(tmp_path / "train.jsonl", [record]))
    assert "<|im_start|>user\nDescribe\nbriefly\nplease.<|im_end|>" in _text(tok, dm.train_rows[0])
    assert _supervised(tok, dm.train_rows[0]) == "Short.\nDone.<|im_end|>"


@pytest.mark.parametrize(
    ("part", "message"),
    [
        ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, r"part type 'image_url' is not supported"),
        ({"type": "input_audio", "input_audio": {"data": "..."}}, r"part type 'input_audio' is not supported"),
        ({"text": "no type"}, r"a part that is not a text part \(\{\"text\": \"no type\"\}\)"),
    ],
    ids=["image_url", "input_audio", "untyped"],
)
def test_a_non_text_content_part_is_refused_naming_file_line_and_type(part, message, tmp_path, tok):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "user", "content": [{"type": "text", "text": "See"}, part]}, ok["messages"][1]]}
    path = _jsonl(tmp_path / "train.jsonl", [ok, ok, bad])
    with pytest.raises(DataError, match=rf"train.jsonl:3: message 0 content part 1: {message}") as err:
        _dm(tok, path)
    assert "\n" not in str(err.value)


# ---- bytes that are not UTF-8 ------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_non_utf8_bytes_name_the_line_and_byte_offset(suffix, tmp_path, tok):
    good = "Caf\u00e9".encode()  # valid UTF-8 before the bad byte: offsets count bytes, not characters
    if suffix == ".jsonl":
        lines = [b'{"prompt": "' + good + b'", "response": "a"}', b'{"prompt": "b", "response": "Jos\xe9"}']
        data = b"\n".join(lines) + b"\n"
    elif suffix == ".json":
        data = b'[\n{"prompt": "' + good + b'", "response": "a"},\n{"prompt": "b", "response": "Jos\xe9"}\n]\n'
    else:
        data = b"prompt,response\n" + good + b",a\nb,Jos\xe9\n"
    offset = data.index(b"\xe9")
    line = data[:offset].count(b"\n") + 1
    path = tmp_path / f"train{suffix}"
    path.write_bytes(data)
    with pytest.raises(DataError, match=rf"train{suffix}:{line}: not UTF-8 text \(byte 0xe9 at byte offset {offset}\)"):
        _dm(tok, path)


def test_a_utf8_byte_order_mark_is_accepted(tmp_path, tok):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "p", "response": "r"}).encode() + b"\n")
    assert _supervised(tok, _dm(tok, path).train_rows[0]) == "r<|im_end|>"


# ---- turn order --------------------------------------------------------------------------------------
def _chat(*roles: str) -> dict:
    return {"messages": [{"role": r, "content": f"{r} {i}"} for i, r in enumerate(roles)]}


def test_out_of_order_turns_warn_once_per_file_naming_the_first_line(tmp_path, tok, caplog):
    records = [
        _chat("user", "assistant"),
        _chat("user", "user", "assistant"),  # line 2: the first out of order
        _chat("system", "assistant", "user", "assistant"),
        _chat("user", "assistant"),
        _chat("user", "assistant", "system", "user", "assistant"),
    ]
    path = _jsonl(tmp_path / "train.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="lora_exp.data"):
        dm = _dm(tok, path, "data.val_path=null", "data.val_size=1", "data.split_seed=0")
    warned = [r.getMessage() for r in caplog.records if "out of the usual order" in r.getMessage()]
    assert len(warned) == 1, warned
    assert f"{path}: 3 conversations" in warned[0]
    assert f"(first: {path}:2: message 1 is a second user turn in a row)" in warned[0]
    assert len(dm.train_rows) + len(dm.val_rows) == 5  # trained as written, not dropped


def test_in_order_turns_do_not_warn_and_no_assistant_turn_is_an_error(tmp_path, tok, caplog):
    path = _jsonl(tmp_path / "train.jsonl", [_chat("system", "user", "assistant", "user", "assistant")])
    with caplog.at_level(logging.WARNING, logger="lora_exp.data"):
        _dm(tok, path)
    assert "out of the usual order" not in caplog.text
    bad = _jsonl(tmp_path / "bad.jsonl", [_chat("user", "assistant"), _chat("system", "user")])
    with pytest.raises(DataError, match=r"bad.jsonl:2: the conversation has no assistant turn"):
        _dm(tok, bad)


# ---- a mapped field that the file lacks ----------------------------------------------------------
def test_a_mapped_field_missing_from_the_file_is_named(tmp_path, tok):
    path = _jsonl(tmp_path / "train.jsonl", [{"q": "2+2?", "a": "4"}])
    with pytest.raises(DataError) as err:
        _dm(tok, path, "data.fields.prompt=question")
    assert str(err.value) == (
        f"{path}:1: fields 'question' (data.fields.prompt) and 'response' (data.fields.response) are missing; "
        "fields found: q, a"
    )
