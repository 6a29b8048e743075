"""Hydra and Lightning conventions through the public CLI: any importable ``_target_``, the learning
rate of every parameter group, and ``resume=true`` training on for more steps."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import train_cli

TINY = ("model=tiny_llama", "debug=quick", "logger=none", "trainer.enable_progress_bar=false")


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]


def test_own_callback_and_lr_of_every_loraplus_group(tmp_path):
    # a user's own callback, importable from the directory the command runs in
    (tmp_path / "my_callbacks.py").write_text(
        "import lightning as L\n"
        "class StepMarker(L.Callback):\n"
        "    def __init__(self, path):\n"
        "        self.path = path\n"
        "    def on_train_end(self, trainer, pl_module):\n"
        "        open(self.path, 'w').write(str(trainer.global_step))\n"
    )
    run_dir = tmp_path / "run"
    marker = tmp_path / "marker.txt"
    train_cli(
        run_dir,
        *TINY,
        "optim=loraplus",
        "trainer.max_steps=3",
        "+callbacks.mine._target_=my_callbacks.StepMarker",
        f"+callbacks.mine.path={marker}",
        cwd=tmp_path,
    )
    assert marker.read_text() == "3"
    # LoRA+ through PEFT: groups A, embedding, B, B without decay; A's and B's rates logged apart
    rates = [r for r in _history(run_dir) if "lr-AdamW/pg1" in r]
    assert len(rates) == 3
    for row in rates:
        assert {"lr-AdamW/pg1", "lr-AdamW/pg2", "lr-AdamW/pg3", "lr-AdamW/pg4"} <= set(row)
        assert row["lr-AdamW/pg3"] == 16 * row["lr-AdamW/pg1"]  # optim.loraplus_lr_ratio
    assert max(r["lr-AdamW/pg1"] for r in rates) == 1.0e-3  # optim.lr after warm-up


def test_target_that_does_not_import_is_named_before_anything_loads(tmp_path):
    proc = train_cli(tmp_path / "run", *TINY, "+callbacks.mine._target_=my_missing_module.Cb", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "callbacks.mine._target_=my_missing_module.Cb: cannot import it" in proc.stderr


def test_resume_trains_on_for_more_steps_and_refuses_other_changes(tmp_path):
    run_dir = tmp_path / "run"
    first = (*TINY, "trainer.max_epochs=3")  # 4 batches an epoch: max_steps ends the run
    train_cli(run_dir, *first)
    assert json.loads((run_dir / "metrics.json").read_text())["trainer/global_step"] == 4

    # another value for a key other than the training length: refused, the key named
    proc = train_cli(run_dir, *first, "resume=true", "trainer.max_steps=6", "lora.r=4", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "overrides differ" in proc.stderr and "lora.r (run: not set, now: lora.r=4)" in proc.stderr
    assert "trainer.max_steps (" not in proc.stderr  # the allowed change is not among the refused ones

    proc = train_cli(run_dir, *first, "resume=true", "trainer.max_steps=6")
    assert "resuming from" in proc.stdout + proc.stderr
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["trainer/global_step"] == 6
    assert len([r for r in _history(run_dir) if "train/loss" in r]) == 6  # 4 steps, then 2 more

    # asked again for the same length: nothing left to do
    proc = train_cli(run_dir, *first, "resume=true", "trainer.max_steps=6")
    assert "already completed" in proc.stdout


def _lora_exp(*args: str, env: dict | None = None) -> str:
    """``lora-exp args...`` through the console script's entry point (``lora_exp.cli:main``)."""
    import os
    import subprocess
    import sys

    code = "import sys; from lora_exp.cli import main; sys.argv[0] = 'lora-exp'; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_shell_completion_of_the_installed_command():
    script = _lora_exp("train", "-sc", "install=bash")
    assert "complete -o nospace -o default -F hydra_bash_completion lora-exp" in script
    # what bash asks while a line is typed: the command word, then the command's groups and keys
    assert _lora_exp("-sc", "query=bash", env={"COMP_LINE": "lora-exp ev"}).split() == ["evaluate"]
    options = _lora_exp("-sc", "query=bash", env={"COMP_LINE": "lora-exp train hparams_search="}).split()
    assert "hparams_search=rank_alpha" in options and "hparams_search=optuna" in options
    assert _lora_exp("-sc", "query=bash", env={"COMP_LINE": "lora-exp train lora.targ"}).split() == [
        "lora.target_modules="
    ]
