"""The tokenized-data cache: a second setup (a second run, a sweep's next point) does no tokenization.

Checked through the data module as a run builds it and through a real two-point sweep: hits give
the same batches, any setting that changes tokens misses, ``data.cache=false`` neither reads nor
writes, a run killed while storing an entry leaves nothing that looks complete, and a large split
is tokenized by several processes with the same result.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, compose, run_cli
from lora_exp.data import tokenized
from lora_exp.data.datamodule import InstructionDataModule
from lora_exp.data.templating import Renderer
from lora_exp.model.load import cache_root, ensure_smollm2_folder, load_tokenizer

LOADED = re.compile(r"data cache: loaded (\d+) tokenized (train|val) rows from (\S+) \(no tokenization\)")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(ensure_smollm2_folder()))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache root of this test's own (the models folder shared, so nothing is converted again)."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "models").symlink_to(cache_root() / "models", target_is_directory=True)
    monkeypatch.setenv("LORA_EXP_CACHE", str(root))
    return root


@pytest.fixture
def encodes(monkeypatch) -> list[int]:
    """Counts the examples tokenized in this process."""
    calls = [0]
    original = Renderer.encode

    def counting(self, example):
        calls[0] += 1
        return original(self, example)

    monkeypatch.setattr(Renderer, "encode", counting)
    return calls


def _data(path: Path, n: int = 24, edit: int | None = None) -> Path:
    lines = []
    for i in range(n):
        answer = "changed" if i == edit else f"The answer is {2 * i}."
        lines.append(json.dumps({"question": f"What is {i} + {i}?" + " Think." * (i % 5), "answer": answer}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _setup(tok, path, *overrides) -> InstructionDataModule:
    cfg = compose(
        "data=jsonl",
        f"data.train_path={path}",
        "data.val_size=4",
        "data.fields.prompt=question",
        "data.fields.response=answer",
        *overrides,
    )
    dm = InstructionDataModule(cfg.data, tok, 0)
    dm.setup("fit")
    return dm


def _batches(dm) -> list:
    return [{k: v.tolist() for k, v in b.items()} for b in [*dm.train_dataloader(), *dm.val_dataloader()]]


def _entries(cache: Path) -> list[Path]:
    folder = cache / "data"
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def test_second_setup_loads_the_cache_does_no_tokenization_and_gives_the_same_batches(
    tmp_path, tok, cache, encodes, caplog, capsys, monkeypatch
):
    path = _data(tmp_path / "train.jsonl")
    with caplog.at_level(logging.INFO, logger="lora_exp.data"):
        first = _setup(tok, path)
    assert encodes[0] >= 24 and not LOADED.search(caplog.text)
    assert "tokenizing train (20 examples)" in capsys.readouterr().err  # the progress bar of the first build
    assert len(_entries(cache)) == 2  # one entry per split

    caplog.clear()
    cfg = first.cfg
    second = InstructionDataModule(cfg, tok, 0)

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized on a cache hit")

    monkeypatch.setattr(type(tok), "__call__", refuse)  # any tokenization now fails the test
    monkeypatch.setattr(type(tok), "apply_chat_template", refuse)
    with caplog.at_level(logging.INFO, logger="lora_exp.data"):
        second.setup("fit")
    hits = LOADED.findall(caplog.text)
    assert sorted((n, split) for n, split, _ in hits) == [("20", "train"), ("4", "val")]
    assert {Path(p) for *_, p in hits} == set(_entries(cache))
    assert "tokenizing" not in capsys.readouterr().err  # no progress bar: nothing to do
    assert second.train_rows == first.train_rows and second.val_rows == first.val_rows
    assert second.fingerprint == first.fingerprint and second.stats == first.stats
    assert _batches(second) == _batches(first)


def test_warnings_of_the_first_build_are_said_again_on_a_hit(tmp_path, tok, cache, caplog):
    path = _data(tmp_path / "train.jsonl")
    with caplog.at_level(logging.WARNING, logger="lora_exp.data"):
        _setup(tok, path, "data.max_seq_len=52")
        built = [r.getMessage() for r in caplog.records]
        caplog.clear()
        hit = _setup(tok, path, "data.max_seq_len=52")
    assert any("truncated to data.max_seq_len=52" in m for m in built)
    assert [r.getMessage() for r in caplog.records] == built
    assert hit.stats["data/truncated"] > 0


@pytest.mark.parametrize(
    "change",
    [
        ["data.max_seq_len=56"],
        ["data.train_on_prompt=true"],
        ["data.chat_template=chatml"],
        ["data.val_size=5"],
        "edited record",
        "other tokenizer",
    ],
    ids=["max_seq_len", "train_on_prompt", "chat_template", "split", "edited_record", "tokenizer"],
)
def test_a_change_that_can_change_tokens_misses_the_cache(change, tmp_path, tok, cache, encodes, caplog):
    path = _data(tmp_path / "train.jsonl")
    _setup(tok, path)
    encodes[0] = 0
    overrides, tokenizer = [], tok
    if change == "edited record":
        path = _data(path, edit=3)
    elif change == "other tokenizer":
        tokenizer = load_tokenizer(str(ensure_smollm2_folder()))
        tokenizer.add_tokens(["<|extra|>"], special_tokens=True)
    else:
        overrides = change
    with caplog.at_level(logging.INFO, logger="lora_exp.data"):
        dm = _setup(tokenizer, path, *overrides)
    assert encodes[0] > 0  # tokenized again
    if change in ("edited record", "split"):  # the other split's examples are the same: that one hits
        assert len(LOADED.findall(caplog.text)) <= 1
    else:
        assert not LOADED.search(caplog.text)
    assert dm.train_rows


def test_cache_false_neither_reads_nor_writes(tmp_path, tok, cache, encodes, caplog):
    path = _data(tmp_path / "train.jsonl")
    _setup(tok, path, "data.cache=false")
    assert _entries(cache) == []
    _setup(tok, path)
    encodes[0] = 0
    with caplog.at_level(logging.INFO, logger="lora_exp.data"):
        _setup(tok, path, "data.cache=false")
    assert encodes[0] >= 24 and "data cache" not in caplog.text


def test_an_unwritable_cache_warns_and_the_run_goes_on(tmp_path, tok, cache, caplog, monkeypatch):
    import datasets

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", disk_full)
    with caplog.at_level(logging.WARNING, logger="lora_exp.data"):
        dm = _setup(tok, _data(tmp_path / "train.jsonl"))
    assert "could not store the tokenized train split" in caplog.text and "No space left" in caplog.text
    assert len(dm.train_rows) == 20
    assert list((cache / "data").iterdir()) == []  # no temporary folder left behind


KILLED_WHILE_STORING = """
import sys, time
sys.path.insert(0, {tests!r})
import datasets
from conftest import compose
from lora_exp.data.datamodule import InstructionDataModule
from lora_exp.model.load import ensure_smollm2_folder, load_tokenizer

save = datasets.Dataset.save_to_disk

def save_then_hang(self, path, **kwargs):
    save(self, path, **kwargs)
    print("stored rows, not yet renamed", flush=True)
    time.sleep(600)

datasets.Dataset.save_to_disk = save_then_hang
cfg = compose("data=jsonl", "data.train_path={path}", "data.val_size=4",
              "data.fields.prompt=question", "data.fields.response=answer")
InstructionDataModule(cfg.data, load_tokenizer(str(ensure_smollm2_folder())), 0).setup("fit")
"""


def test_a_run_killed_while_storing_leaves_no_entry_that_looks_complete(tmp_path, tok, cache, encodes, caplog):
    path = _data(tmp_path / "train.jsonl")
    script = KILLED_WHILE_STORING.format(tests=str(ROOT / "tests"), path=path)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        said = []
        for line in proc.stdout:  # its own output, up to the moment it hangs inside the store
            said.append(line.strip())
            if said[-1] == "stored rows, not yet renamed":
                break
        assert said and said[-1] == "stored rows, not yet renamed", said
        os.kill(proc.pid, signal.SIGKILL)  # what the OOM killer or a scheduler does
    finally:
        proc.kill()
        proc.wait(timeout=60)
    leftovers = list((cache / "data").iterdir())
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers)  # the half entry, named as such
    with caplog.at_level(logging.INFO, logger="lora_exp.data"):
        dm = _setup(tok, path)
    assert not LOADED.search(caplog.text) and encodes[0] >= 24  # rebuilt, not read from the half entry
    assert len(_entries(cache)) == 2 and len(dm.train_rows) == 20


def test_a_large_split_is_tokenized_by_several_processes_with_the_same_rows(tmp_path, tok, cache, monkeypatch, capsys):
    path = _data(tmp_path / "train.jsonl", n=40)
    single = _setup(tok, path, "data.cache=false")
    assert "processes" not in capsys.readouterr().err
    monkeypatch.setattr(tokenized, "MULTIPROCESS_MIN_EXAMPLES", 10)  # 36 train examples count as large
    monkeypatch.setattr(tokenized, "MAX_PROCESSES", 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert tokenized.num_proc(36) == 2 and tokenized.num_proc(10) is None
    multi = _setup(tok, path, "data.cache=false")
    assert "tokenizing train (36 examples, 2 processes)" in capsys.readouterr().err
    assert multi.train_rows == single.train_rows and multi.val_rows == single.val_rows
    assert multi.fingerprint == single.fingerprint


@pytest.mark.slow
def test_a_sweeps_second_point_loads_the_cache(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    (root / "models").symlink_to(cache_root() / "models", target_is_directory=True)
    sweep = tmp_path / "sweep"
    run_cli(
        "lora_exp.train",
        "-m",
        "seed=0,1",
        "model=tiny_llama",
        "debug=quick",
        "logger=none",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=0",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        env={"LORA_EXP_CACHE": str(root)},
    )
    first, second = (sweep / "0" / "train.log").read_text(), (sweep / "1" / "train.log").read_text()
    assert "data cache: stored the tokenized train split" in first and not LOADED.search(first)
    assert sorted(split for _, split, _ in LOADED.findall(second)) == ["train", "val"]
    assert "data cache: stored" not in second
    fingerprints = [json.loads((sweep / i / "metrics.json").read_text())["data/fingerprint"] for i in "01"]
    assert fingerprints[0] == fingerprints[1]
