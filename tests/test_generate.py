"""``lora_exp.generate``: chat template applied, tokens streamed, sampling options, terminal chat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import OFFLINE_ENV, run_cli
from lora_exp.data.tasks import INSTRUCTION
from lora_exp.inference import generate
from lora_exp.inference import session as inference


@pytest.fixture(scope="module")
def tiny_chat(tiny_run: Path):
    """The tiny run's base + adapter and tokenizer, loaded once."""
    from lora_exp.model.load import load_tokenizer

    run = inference.load_run(tiny_run)
    folder = inference.base_folder(run)
    return inference.attach_adapters(inference.load_base(run, folder), [run]), load_tokenizer(folder)


def _options(**kw):
    return OmegaConf.create({"max_new_tokens": 12, "temperature": 0.0, "top_p": 0.9, "seed": 0, **kw})


def test_streamed_reply_is_greedy_decoding_of_the_chat_template(tiny_chat, capsys):
    """The streamed text is the reply, and equals greedy decoding of the templated prompt."""
    model, tokenizer = tiny_chat
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    text = generate.reply(model, tokenizer, messages, _options())
    assert text and capsys.readouterr().out.rstrip("\n") == text.rstrip("\n")

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text == expected


def test_sampling_follows_the_seed(tiny_chat, capsys):
    from transformers import set_seed

    model, tokenizer = tiny_chat
    messages = [{"role": "user", "content": "Tell me a story."}]
    replies = []
    for seed in (0, 0, 1):
        set_seed(seed)
        replies.append(generate.reply(model, tokenizer, messages, _options(temperature=1.0, top_p=1.0)))
    assert replies[0] == replies[1] != replies[2]


@pytest.mark.parametrize(
    "prompt",
    ['Hello, [world] {x} ${y} it\'s a \\ "test": a=b', "ends in a backslash\\", "it\\'s", "a,b", "=x"],
)
def test_free_text_reaches_the_config_verbatim(prompt):
    """prompt= values with commas, brackets, quotes and ${...} survive Hydra's override grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lora_exp.inference.session import quote_free_text

    args = quote_free_text([f"prompt={prompt}", "max_new_tokens=3", "system='already quoted'"], generate.FREE_TEXT_KEYS)
    parsed = OverridesParser.create().parse_overrides(args)
    cfg = OmegaConf.create({o.key_or_group: o.value() for o in parsed})
    assert cfg.prompt == prompt and cfg.max_new_tokens == 3 and cfg.system == "already quoted"


def test_interactive_chat_over_piped_stdin(tiny_run: Path, tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "lora_exp.generate", f"run_dir={tiny_run}", "max_new_tokens=5", "temperature=1"],
        input="first question\n/reset\nsecond, question\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, **OFFLINE_ENV},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("you> ") == 4 and proc.stdout.count("assistant> ") == 2
    first, second = proc.stdout.split("assistant> ")[1:]
    assert first.split("\n")[0].strip() and second.split("\n")[0].strip()


def test_bad_sampling_options_are_one_error(tiny_run: Path, tmp_path: Path):
    proc = run_cli(
        "lora_exp.generate", f"run_dir={tiny_run}", "temperature=-1", "top_p=0", "prompt=hi", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2
    assert "temperature=-1" in proc.stderr and "top_p=0" in proc.stderr


@pytest.mark.slow
def test_default_model_answers_the_task_prompt(default_run: Path, tmp_path: Path):
    """The trained default model, greedy, answers a task prompt with text about the person."""
    sentence = "Ada is 31 years old and works as a pilot in Oslo."
    proc = run_cli(
        "lora_exp.generate",
        f"run_dir={default_run}",
        f"prompt={INSTRUCTION}{sentence}",
        "temperature=0",
        "max_new_tokens=16",
        cwd=tmp_path,
    )
    assert "Ada" in proc.stdout
    assert json.loads((default_run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
