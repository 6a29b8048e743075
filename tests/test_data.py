"""Data: every format renders and masks as expected token by token; packing, shuffling, fingerprint, bad data.

Masks are checked on the default model's tokenizer (ChatML-style template) and on a Llama-3.1-style
tokenizer: the default tokenizer with Llama-3's special tokens, BOS-adding behaviour and Meta's
Llama-3.1 chat template (the hub is not reachable from tests).
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from conftest import compose
from lora_exp import metrics as M
from lora_exp.data import formats
from lora_exp.data.datamodule import InstructionDataModule
from lora_exp.data.packing import PackCollator, PadCollator
from lora_exp.data.sources import Record
from lora_exp.data.templating import CHAT_TEMPLATES, IGNORE_INDEX, Renderer
from lora_exp.errors import DataError
from lora_exp.model.load import ensure_smollm2_folder, load_tokenizer

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA_SPECIALS += ["<|finetune_right_pad_id|>"]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Peru?"},
    {"role": "assistant", "content": "Lima, on the coast."},
]


@pytest.fixture(autouse=True)
def _own_data_cache(tmp_path, monkeypatch):
    """Each test tokenizes for real (a cache of its own; the converted models are shared)."""
    from lora_exp.model.load import cache_root

    (tmp_path / "lora-exp-cache").mkdir()
    (tmp_path / "lora-exp-cache" / "models").symlink_to(cache_root() / "models", target_is_directory=True)
    monkeypatch.setenv("LORA_EXP_CACHE", str(tmp_path / "lora-exp-cache"))


@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer(str(ensure_smollm2_folder()))


@pytest.fixture(scope="module")
def llama_tok():
    """The default tokenizer dressed as Llama-3.1 Instruct's: its special tokens, BOS on encode, its template."""
    tok = load_tokenizer(str(ensure_smollm2_folder()))
    tok.add_tokens(LLAMA_SPECIALS, special_tokens=True)
    tok.bos_token, tok.eos_token, tok.pad_token = "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>"
    tok.add_bos_token = True  # like Llama-3's tokenizer: plain encode() prepends BOS
    tok.chat_template = CHAT_TEMPLATES["llama3_1"]
    assert tok("hi")["input_ids"][0] == tok.bos_token_id
    return tok


def _supervised_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs, cur = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i  # a supervised label is always the token itself
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _tok(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- rendering and masks, token by token ---------------------------------------------------------
def test_llama31_template_renders_metas_format(llama_tok):
    text = llama_tok.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
    )


@pytest.mark.parametrize("which", ["smol", "llama"])
def test_multi_turn_chat_supervises_every_reply_and_its_eos(which, smol_tok, llama_tok):
    tok = smol_tok if which == "smol" else llama_tok
    row = Renderer(tok, 1024).encode({"messages": CONVERSATION})
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert row.input_ids == _tok(tok, text)  # the template's text, tokenized once, nothing added
    eos = tok.eos_token_id
    expected = [_tok(tok, "Paris.") + [eos], _tok(tok, "Lima, on the coast.") + [eos]]
    assert _supervised_runs(row.input_ids, row.labels) == expected
    assert row.input_ids[:2] != [tok.bos_token_id] * 2
    if which == "llama":  # a dedicated BOS: exactly one, first, never a target
        assert row.input_ids.count(tok.bos_token_id) == 1 and row.input_ids[0] == tok.bos_token_id
    assert row.labels[0] == IGNORE_INDEX


@pytest.mark.parametrize("which", ["smol", "llama"])
def test_train_on_prompt_supervises_everything_but_the_first_token(which, smol_tok, llama_tok):
    tok = smol_tok if which == "smol" else llama_tok
    row = Renderer(tok, 1024, train_on_prompt=True).encode({"messages": CONVERSATION})
    assert row.labels[0] == IGNORE_INDEX and row.labels[1:] == row.input_ids[1:]


@pytest.mark.parametrize(
    ("record", "fields", "fmt", "user", "reply"),
    [
        ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, {}, "alpaca", "Add.\n\n2 and 3", "5"),
        ({"instruction": "Say hi.", "input": "", "output": "hi"}, {}, "alpaca", "Say hi.", "hi"),
        (
            {"question": "What is 6 x 7?", "answer": "42", "id": 3},
            {"prompt": "question", "response": "answer"},
            "prompt_response",
            "What is 6 x 7?",
            "42",
        ),
        ({"prompt": "Ping", "response": "Pong"}, {}, "prompt_response", "Ping", "Pong"),
        ({"messages": CONVERSATION[1:3]}, {}, "chat", "Capital of France?", "Paris."),
        (
            {"conversations": [{"from": "human", "value": "Yo"}, {"from": "gpt", "value": "Hey"}]},
            {},
            "chat",
            "Yo",
            "Hey",
        ),
    ],
)
@pytest.mark.parametrize("which", ["smol", "llama"])
def test_each_format_is_detected_and_masks_only_the_reply(record, fields, fmt, user, reply, which, smol_tok, llama_tok):
    tok = smol_tok if which == "smol" else llama_tok
    names = formats.field_names(fields)
    rec = Record(record, "mem:1")
    assert formats.resolve("auto", [rec], names) == fmt
    example = formats.convert(rec, fmt, names)
    assert example["messages"][-2:] == [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    row = Renderer(tok, 1024).encode(example)
    assert _supervised_runs(row.input_ids, row.labels) == [_tok(tok, reply) + [tok.eos_token_id]]


@pytest.mark.parametrize("which", ["smol", "llama"])
def test_plain_text_gets_one_bos_where_the_model_expects_it_and_a_supervised_eos(which, smol_tok, llama_tok):
    tok = smol_tok if which == "smol" else llama_tok
    rec = Record({"text": "Once upon a time."}, "mem:1")
    assert formats.resolve("auto", [rec], formats.field_names({})) == "text"
    row = Renderer(tok, 1024).encode(formats.convert(rec, "text", formats.field_names({})))
    body = _tok(tok, "Once upon a time.") + [tok.eos_token_id]
    bos = [tok.bos_token_id] if which == "llama" else []
    assert row.input_ids == bos + body
    assert row.labels == [IGNORE_INDEX] + row.input_ids[1:]  # everything but the first token
    # text that already starts with BOS does not get a second one
    again = Renderer(tok, 1024).encode({"text": "<|begin_of_text|>Hi"}) if which == "llama" else None
    assert again is None or again.input_ids.count(tok.bos_token_id) == 1


def test_a_template_that_doubles_bos_is_refused(llama_tok):
    double = "{{ bos_token }}" + CHAT_TEMPLATES["llama3_1"]
    with pytest.raises(DataError, match="two BOS"):
        Renderer(llama_tok, 1024, chat_template=double).encode({"messages": CONVERSATION})


def test_a_template_without_end_of_turn_token_warns_that_the_model_will_not_stop(smol_tok, caplog):
    bare = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
    with caplog.at_level("WARNING"):
        row = Renderer(smol_tok, 1024, chat_template=bare).encode({"messages": CONVERSATION[1:3]})
    assert "will not learn to stop" in caplog.text
    assert smol_tok.decode([i for i, label in zip(row.input_ids, row.labels) if label != IGNORE_INDEX]) == " Paris.\n"


def test_padding_is_never_supervised_and_eos_stays_supervised_when_pad_equals_eos(smol_tok):
    r = Renderer(smol_tok, 1024)
    rows = [r.encode({"messages": CONVERSATION[1:3]}), r.encode({"messages": CONVERSATION})]
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in rows]
    eos = smol_tok.eos_token_id
    batch = PadCollator(pad_token_id=eos)(rows)  # the pad == eos trap: masking must go by position
    short = len(rows[0]["input_ids"])
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, short:] == 0).all()
    assert (batch["input_ids"][0, short:] == eos).all()
    for i, row in enumerate(rows):
        n_eos = sum(1 for t, label in zip(row["input_ids"], row["labels"]) if t == eos and label == eos)
        assert (batch["labels"][i] == eos).sum() == n_eos >= 1


# ---- data module: files, split, truncation, stats ------------------------------------------------
def _qa(n: int, seed: int = 0) -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        pad = " Please answer carefully." * rng.randint(0, 6)  # variable lengths
        out.append({"question": f"What is {a} plus {b}?{pad}", "answer": f"The answer is {a + b}.", "id": i})
    return out


def _write(path, records: list[dict]):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    return path


def _dm(tok, *overrides, seed: int = 0) -> InstructionDataModule:
    cfg = compose("data=jsonl", "data.fields.prompt=question", "data.fields.response=answer", *overrides)
    dm = InstructionDataModule(cfg.data, tok, seed)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_gives_the_same_token_stream(suffix, tmp_path, smol_tok):
    records = [{k: str(v) for k, v in r.items()} for r in _qa(30)]  # CSV has strings only
    path = _write(tmp_path / f"train{suffix}", records)
    dm = _dm(smol_tok, f"data.train_path={path}", "data.val_size=5")
    ref = _dm(smol_tok, f"data.train_path={_write(tmp_path / 'ref.jsonl', records)}", "data.val_size=5")
    assert dm.stats[M.DATA_FORMAT] == "prompt_response"
    assert (len(dm.train_rows), len(dm.val_rows)) == (25, 5)
    assert dm.train_rows == ref.train_rows and dm.fingerprint == ref.fingerprint


def test_held_out_split_is_deterministic_disjoint_and_independent_of_the_training_seed(tmp_path, smol_tok):
    path = _write(tmp_path / "train.jsonl", _qa(40))
    a = _dm(smol_tok, f"data.train_path={path}", "data.val_size=0.25", seed=0)
    b = _dm(smol_tok, f"data.train_path={path}", "data.val_size=0.25", seed=7)
    c = _dm(smol_tok, f"data.train_path={path}", "data.val_size=0.25", "data.split_seed=1")
    assert a.val_rows == b.val_rows and len(a.val_rows) == 10 and len(a.train_rows) == 30
    assert a.val_rows != c.val_rows
    key = lambda rows: {tuple(r["input_ids"]) for r in rows}  # noqa: E731
    assert not key(a.train_rows) & key(a.val_rows)
    val = _write(tmp_path / "val.jsonl", _qa(6, seed=1))
    d = _dm(smol_tok, f"data.train_path={path}", f"data.val_path={val}")
    assert (len(d.train_rows), len(d.val_rows)) == (40, 6)


def test_truncation_is_counted_and_an_all_too_long_set_is_an_error(tmp_path, smol_tok):
    path = _write(tmp_path / "train.jsonl", _qa(20))
    full = _dm(smol_tok, f"data.train_path={path}", "data.val_size=2")
    lengths = [len(r["input_ids"]) for r in full.train_rows + full.val_rows]
    limit = sorted(lengths)[len(lengths) // 2]
    dm = _dm(smol_tok, f"data.train_path={path}", "data.val_size=2", f"data.max_seq_len={limit}")
    assert full.stats[M.DATA_TRUNCATED] == 0
    assert dm.stats[M.DATA_TRUNCATED] == sum(n > limit for n in lengths) > 0
    assert all(len(r["input_ids"]) <= limit for r in dm.train_rows + dm.val_rows)
    with pytest.raises(DataError, match="every train example .* longer than data.max_seq_len=8"):
        _dm(smol_tok, f"data.train_path={path}", "data.val_size=2", "data.max_seq_len=8")


def test_shuffling_is_deterministic_by_seed_and_changes_per_epoch(tmp_path, smol_tok):
    from lightning.fabric.utilities.data import _set_sampler_epoch

    path = _write(tmp_path / "train.jsonl", _qa(40))
    modules = {
        (seed, packing): _dm(
            smol_tok, f"data.train_path={path}", f"data.packing={packing}", "data.pack_tokens=800", seed=seed
        )
        for seed in (0, 1)
        for packing in (False, True)
    }

    def order(seed: int, epoch: int = 0, packing: bool = False) -> list[list[int]]:
        loader = modules[seed, packing].train_dataloader()
        _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop calls before each epoch
        return [b["input_ids"].tolist() for b in loader]

    for packing in (False, True):
        assert order(0, packing=packing) == order(0, packing=packing)
        assert order(0, packing=packing) != order(1, packing=packing)
        assert order(0, 1, packing) != order(0, packing=packing) and order(0, 1, packing) == order(0, 1, packing)


def test_fingerprint_follows_examples_template_and_tokenizer_not_the_seed(tmp_path, smol_tok, llama_tok):
    records = _qa(20)
    path = _write(tmp_path / "train.jsonl", records)
    base = _dm(smol_tok, f"data.train_path={path}", "data.val_size=4").fingerprint
    assert len(base) == 64
    assert _dm(smol_tok, f"data.train_path={path}", "data.val_size=4", seed=3).fingerprint == base
    assert _dm(smol_tok, f"data.train_path={path}", "data.val_size=4", "data.chat_template=chatml").fingerprint != base
    assert _dm(llama_tok, f"data.train_path={path}", "data.val_size=4").fingerprint != base
    records[5]["answer"] = "The answer is unknown."
    edited = _write(tmp_path / "edited.jsonl", records)
    assert _dm(smol_tok, f"data.train_path={edited}", "data.val_size=4").fingerprint != base


# ---- packing ---------------------------------------------------------------------------------
def test_packed_batches_have_no_padding_and_restart_positions(tmp_path, smol_tok):
    path = _write(tmp_path / "train.jsonl", _qa(60))
    unpacked = _dm(
        smol_tok, f"data.train_path={path}", "data.val_size=4", "data.batch_size=4", "data.padding_free=false"
    )
    packed = _dm(smol_tok, f"data.train_path={path}", "data.val_size=4", "data.packing=true", "data.pack_tokens=600")
    assert unpacked.stats[M.DATA_PADDING_FRACTION] > 0.05  # variable lengths: padding is real
    assert packed.stats[M.DATA_PADDING_FRACTION] < 0.05
    lengths = sorted(len(r["input_ids"]) for r in packed.train_rows)
    seen = []
    for batch in packed.train_dataloader():
        assert set(batch) == {"input_ids", "labels", "position_ids"}  # no mask: attention follows positions
        pos = batch["position_ids"][0]
        starts = (pos == 0).nonzero().flatten().tolist()
        ends = starts[1:] + [pos.numel()]
        seen += [e - s for s, e in zip(starts, ends)]
        assert batch["input_ids"].shape[1] <= 600
        assert (batch["labels"][0, starts] == IGNORE_INDEX).all()  # never predict across a boundary
    assert sorted(seen) == lengths  # every example exactly once, nothing but examples


def test_packed_loss_equals_unpacked_loss_and_attention_stays_inside_examples(tiny_peft, smol_tok):
    from lora_exp.training.loss import causal_lm_loss

    r = Renderer(smol_tok, 1024)
    examples = [
        CONVERSATION,
        CONVERSATION[1:3],
        CONVERSATION[3:5],
        [{"role": "user", "content": "?"}] + [CONVERSATION[4]],
    ]
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in (r.encode({"messages": m}) for m in examples)]
    padded, packed = PadCollator(smol_tok.pad_token_id)(rows), PackCollator()(rows)
    with torch.no_grad():
        a = causal_lm_loss(tiny_peft, padded)
        b = causal_lm_loss(tiny_peft, packed)
        assert a.n_tokens == b.n_tokens
        torch.testing.assert_close(b.loss_sum, a.loss_sum, rtol=1e-5, atol=1e-5)
        # packed logits == each example alone (no leak from earlier examples in the row)
        model = tiny_peft.get_base_model()
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        offset = 0
        for row in rows:
            n = len(row["input_ids"])
            alone = model(input_ids=torch.tensor([row["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[offset : offset + n], alone, rtol=1e-4, atol=1e-4)
            offset += n
        # the control: the same row without restarting positions leaks into the later examples
        leaky = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
        n0 = len(rows[0]["input_ids"])
        assert not torch.allclose(leaky[n0:], logits[n0:], atol=1e-3)


# ---- bad data: one clear error naming file, line, field ---------------------------------------
@pytest.mark.parametrize(
    ("content", "overrides", "message"),
    [
        (None, [], r"data.train_path=.*missing.jsonl: file not found"),
        ("", [], r"train.jsonl: empty file"),
        ('{"question": "a", "answer": "b"}\n{"question": "c", "answer": \n', [], r"train.jsonl:2: malformed JSON line"),
        (
            '{"question": "a", "answer": "b"}\n{"question": "c", "solution": "d"}\n',
            [],
            r"train.jsonl:2: field 'answer' \(data.fields.response\) is missing; fields found: question, solution",
        ),
        (
            '{"q": "a", "a": "b"}\n',
            ["data.format=auto", "data.fields.response=a"],
            r"train.jsonl:1: field 'question' \(data.fields.prompt\) is missing; fields found: q, a$",
        ),
        (
            '{"q": "a", "a": "b"}\n',
            ["data.fields.prompt=prompt", "data.fields.response=response"],
            r"train.jsonl:1: cannot detect the data format from the fields q, a",
        ),
        ('{"question": "a", "answer": "b"}\n', ["data.format=yaml"], r"data.format='yaml': unknown format"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', ["data.format=chat"], r"train.jsonl:1: .*no assistant"),
        ("[1, 2]\n", [], r"train.jsonl:1: expected a JSON object"),
    ],
    ids=[
        "missing_file",
        "empty",
        "malformed_line",
        "missing_field",
        "mapped_field_missing",
        "undetectable",
        "unknown_format",
        "no_reply",
        "array",
    ],
)
def test_bad_data_is_one_clear_error(content, overrides, message, tmp_path, smol_tok):
    path = tmp_path / ("missing.jsonl" if content is None else "train.jsonl")
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        _dm(smol_tok, f"data.train_path={path}", "data.val_path=" + str(path), *overrides)
    assert "\n" not in str(err.value)


def test_hub_data_set_offline_says_so(smol_tok):
    cfg = compose("data=alpaca")
    with pytest.raises(DataError, match="tatsu-lab/alpaca: not in the local datasets cache .*offline"):
        InstructionDataModule(cfg.data, smol_tok, 0).setup("fit")


def test_preview_marks_the_supervised_text(tmp_path, capsys):
    from lora_exp.data.preview import main

    path = _write(tmp_path / "train.jsonl", _qa(6))
    args = ["-n", "2", "data=jsonl", f"data.train_path={path}", "data.val_size=1"]
    assert main([*args, "data.fields.prompt=question", "data.fields.response=answer"]) == 0
    out = capsys.readouterr().out
    assert out.count("===== train example") == 2 and "format prompt_response" in out
    assert "[[The answer is" in out and ".<|im_end|>]]" in out
    assert "<|im_start|>user\nWhat is" in out  # the prompt is shown, unmarked
    assert main(["data=jsonl", f"data.train_path={path}", "data.format=nope"]) == 2
    assert "error: data.format='nope'" in capsys.readouterr().err


def test_padding_free_default_keeps_batch_size_examples_per_step_in_one_row(tmp_path, smol_tok, tiny_peft):
    """The default batches: exactly data.batch_size examples, flattened, positions restarting; same loss as padded."""
    from lora_exp.training.loss import causal_lm_loss

    path = _write(tmp_path / "train.jsonl", _qa(30))
    free = _dm(smol_tok, f"data.train_path={path}", "data.val_size=4", "data.batch_size=4")
    padded = _dm(smol_tok, f"data.train_path={path}", "data.val_size=4", "data.batch_size=4", "data.padding_free=false")
    assert free.stats[M.DATA_BATCHING] == "padding_free" and padded.stats[M.DATA_BATCHING] == "padded"
    assert free.stats[M.DATA_PADDING_FRACTION] == 0.0 < padded.stats[M.DATA_PADDING_FRACTION]
    free_batches, padded_batches = list(free.train_dataloader()), list(padded.train_dataloader())
    assert len(free_batches) == len(padded_batches) == 7  # 26 examples in batches of 4: same steps per epoch
    for fb, pb in zip(free_batches, padded_batches):
        assert set(fb) == {"input_ids", "labels", "position_ids"} and fb["input_ids"].shape[0] == 1
        assert int((fb["position_ids"][0] == 0).sum()) == pb["input_ids"].shape[0]  # the same examples
        assert fb["input_ids"].shape[1] == int(pb["attention_mask"].sum())  # and not one pad token
    with torch.no_grad():
        a, b = causal_lm_loss(tiny_peft, free_batches[0]), causal_lm_loss(tiny_peft, padded_batches[0])
    assert int(a.n_tokens) == int(b.n_tokens)
    torch.testing.assert_close(a.loss_sum, b.loss_sum, rtol=1e-5, atol=1e-4)
