"""Data through the public CLI: a local JSONL file with field mapping trains; bad data stops cleanly."""

from __future__ import annotations

import json
import random

import pytest

from conftest import train_cli
from lora_exp import metrics as M
from lora_exp.runs.rundir import read_metrics


def _gsm8k_style(path, n: int):
    """A GSM8K-shaped file (question / answer) with variable-length questions and one answer style."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            question = f"What is {a} plus {b}?" + " Show the sum." * rng.randint(0, 4)
            f.write(json.dumps({"question": question, "answer": f"{a} + {b} = {a + b}. The answer is {a + b}."}) + "\n")
    return path


@pytest.mark.slow
def test_local_jsonl_with_field_mapping_and_packing_trains_the_default_model(tmp_path):
    data = _gsm8k_style(tmp_path / "gsm.jsonl", 80)
    run_dir = tmp_path / "run"
    proc = train_cli(
        run_dir,
        "data=jsonl",
        f"data.train_path={data}",
        "data.val_size=16",
        "data.fields.prompt=question",
        "data.fields.response=answer",
        "data.packing=true",
        "data.pack_tokens=512",
        "trainer.max_steps=6",
        "optim.warmup_steps=1",
        "logger=csv",
    )
    record = read_metrics(run_dir)
    assert record[M.STATUS] == M.STATUS_COMPLETED
    assert "data.format=auto: detected 'prompt_response'" in proc.stdout
    assert record[M.DATA_FORMAT] == "prompt_response" and record[M.DATA_PACKING] is True
    assert (record[M.DATA_TRAIN_EXAMPLES], record[M.DATA_VAL_EXAMPLES]) == (64, 16)
    assert record[M.DATA_PADDING_FRACTION] < 0.05
    assert len(record[M.DATA_FINGERPRINT]) == 64
    assert record[M.VAL_LOSS] < record[M.base(M.VAL_LOSS)]  # held-out loss improves


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "a", "answer": "b"}\n{"question": "c" "answer": "d"}\n', r"train.jsonl:2: malformed JSON line"),
        ('{"question": "a", "answer": "b"}\n{"question": "c", "reply": "d"}\n', r"train.jsonl:2: field 'answer'"),
        (
            b'{"question": "a", "answer": "b"}\n{"question": "Jos\xe9", "answer": "d"}\n',
            r"train.jsonl:2: not UTF-8 text \(byte 0xe9 at byte offset 50\)",
        ),
        (
            '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}\n',
            r"train.jsonl:1: message 0 content part 0: part type 'image_url' is not supported",
        ),
    ],
    ids=["malformed_line", "missing_field", "not_utf8", "image_part"],
)
def test_bad_data_exits_2_with_one_line_and_no_finished_run(content, message, tmp_path):
    import re

    data = tmp_path / "train.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    run_dir = tmp_path / "run"
    proc = train_cli(
        run_dir,
        "model=tiny_llama",
        "data=jsonl",
        f"data.train_path={data}",
        f"data.val_path={data}",
        "data.fields.prompt=question",
        "data.fields.response=answer",
        check=False,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lora_exp.train: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "adapter").exists()
    if (run_dir / "metrics.json").exists():
        assert read_metrics(run_dir)[M.STATUS] != M.STATUS_COMPLETED
