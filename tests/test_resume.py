"""One reference run: resumed after SIGKILL (also mid checkpoint write) it ends bit for bit the same; it reproduces."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import OFFLINE_ENV, run_cli, train_cli

# fp32, 2.5 epochs of 4 batches, a checkpoint every 3 steps: kills land mid-epoch, in epoch 1
RUN = (
    "model=tiny_llama",
    "trainer.accelerator=cpu",  # bitwise equality is promised on CPU
    "logger=none",
    "trainer.precision=32-true",
    "data.num_train=32",
    "data.num_val=8",
    "data.batch_size=8",
    "trainer.max_steps=10",
    "trainer.max_epochs=3",
    "checkpoint.every_n_steps=3",
    "optim.warmup_steps=1",
    "trainer.enable_progress_bar=false",
)

# Runs the real CLI in a subprocess that SIGKILLs itself at a chosen moment: after a given step,
# or halfway through writing the n-th checkpoint file.
KILLER = r"""
import os, signal, sys
import torch
from lora_exp.training import callbacks
from lora_exp.training import resume

kill_after_step = int(os.environ.get("KILL_AFTER_STEP", "-1"))
kill_in_save = int(os.environ.get("KILL_IN_SAVE", "-1"))

end = callbacks.Throughput.on_train_batch_end
def on_train_batch_end(self, trainer, *args, **kwargs):
    end(self, trainer, *args, **kwargs)
    if trainer.global_step == kill_after_step:
        os.kill(os.getpid(), signal.SIGKILL)
callbacks.Throughput.on_train_batch_end = on_train_batch_end

saves = 0
real_save = torch.save
def half_save(obj, f, *args, **kwargs):
    global saves
    saves += 1
    if saves != kill_in_save:
        return real_save(obj, f, *args, **kwargs)
    import io
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_save

from lora_exp.train import main
sys.argv = ["lora_exp/train.py", *sys.argv[1:]]
main()
"""


def run_killed(tmp_path: Path, run_dir: Path, *overrides: str, **env: str) -> subprocess.CompletedProcess:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    return subprocess.run(
        [sys.executable, str(script), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV, **env},
        timeout=600,
    )


def status_eventually(run_dir: Path, wanted: str, seconds: float = 20) -> str:
    """metrics.json's status; the watcher process rewrites it a moment after the kill."""
    deadline = time.time() + seconds
    while True:
        status = json.loads((run_dir / "metrics.json").read_text())["status"]
        if status == wanted or time.time() > deadline:
            return status
        time.sleep(0.2)


def results(run_dir: Path) -> dict:
    from lora_exp.runs.reproduce import comparable

    record = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in record.items() if comparable(k, v)}


FAKE_KEY = "f" * 8 + "0123456789abcdef0123456789abcdef"  # a W&B key that must never be written anywhere


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference run: resumed runs must end like it, and ``reproduce`` must repeat it exactly."""
    run_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    train_cli(run_dir, *RUN, env={"WANDB_API_KEY": FAKE_KEY, "HF_TOKEN": "hf_" + "x" * 30})
    return run_dir


def test_sigkill_during_checkpoint_write_and_mid_run_then_resume_is_bitwise_equal(uninterrupted, tmp_path):
    from lora_exp.training.resume import latest_checkpoint

    run_dir = tmp_path / "run"
    # 1) killed halfway through writing step 6's checkpoint (the 3rd file; step 3 wrote
    #    step000003.ckpt and last.ckpt): step 3's files stay intact and the latest
    proc = run_killed(tmp_path, run_dir, *RUN, KILL_IN_SAVE="3")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert status_eventually(run_dir, "interrupted") == "interrupted"
    assert list((run_dir / "checkpoints").glob(".*.tmp*")), "the cut write should have left only a temporary file"
    latest = latest_checkpoint(run_dir / "checkpoints")
    import torch

    assert torch.load(latest, weights_only=True)["global_step"] == 3
    assert not (run_dir / "adapter").exists()

    # 2) resumed from step 3, then killed outright after step 8 (mid-epoch 1, between checkpoints)
    proc = run_killed(tmp_path, run_dir, *RUN, "resume=true", KILL_AFTER_STEP="8")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert status_eventually(run_dir, "interrupted") == "interrupted"
    assert "resuming from" in proc.stderr + proc.stdout

    # 3) resumed from step 6 to the end: same adapter bytes and metrics as never interrupted
    train_cli(run_dir, *RUN, "resume=true")
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    a = (uninterrupted / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b
    assert results(run_dir) == results(uninterrupted)
    assert len(json.loads((run_dir / "run.json").read_text())["resumed"]) == 2


def test_resume_of_a_completed_run_does_nothing(uninterrupted):
    before = (uninterrupted / "metrics.json").read_text()
    proc = train_cli(uninterrupted, *RUN, "resume=true")
    assert "already completed" in proc.stdout
    assert (uninterrupted / "metrics.json").read_text() == before


def test_resume_with_other_overrides_is_refused(uninterrupted, tmp_path):
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    for name in ("metrics.json", "run.json"):
        (run_dir / name).write_text((uninterrupted / name).read_text().replace('"completed"', '"interrupted"'))
    proc = train_cli(run_dir, *RUN, "lora.r=4", "resume=true", check=False)
    assert proc.returncode == 2
    assert "overrides differ" in proc.stderr and "Traceback" not in proc.stderr


def test_run_json_fingerprints_the_run(uninterrupted):
    from lora_exp.runs.provenance import adapter_hash

    run = json.loads((uninterrupted / "run.json").read_text())
    assert run["command"][:3] == ["python", "-m", "lora_exp.train"] and run["seed"] == 0
    assert set(run["overrides"]) == set(RUN)
    assert run["git"]["commit"] and isinstance(run["git"]["dirty"], bool)
    assert {"python", "torch", "transformers", "peft", "lightning", "hydra-core", "bitsandbytes", "wandb"} <= set(
        run["packages"]
    )
    assert run["hardware"]["cpu_count"] >= 1 and isinstance(run["hardware"]["gpu_count"], int)
    assert run["data_fingerprint"] and len(run["initial_adapter_sha256"]) == 64
    assert run["model_fingerprint"]["files"]["model.safetensors"]
    assert run["adapter_sha256"] == adapter_hash(uninterrupted)
    freeze = (uninterrupted / "pip-freeze.txt").read_text()
    assert "torch==" in freeze and "peft==" in freeze


def test_secrets_never_reach_the_run_directory(uninterrupted):
    for path in uninterrupted.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert FAKE_KEY.encode() not in data and b"hf_xxxxxxxx" not in data, path


def test_reproduce_repeats_the_run_bit_for_bit(uninterrupted, tmp_path):
    out = tmp_path / "again"
    proc = run_cli("lora_exp.reproduce", str(uninterrupted), "--out", str(out), cwd=tmp_path)
    assert "REPRODUCED" in proc.stdout and "adapter: identical" in proc.stdout
    a = (uninterrupted / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b  # same config and seed on CPU: identical adapter bytes
    report = json.loads((out / "reproduce.json").read_text())
    assert report["matches"] and report["mismatched_metrics"] == []
    # the smallest difference in a result counts on CPU
    from lora_exp.runs.reproduce import compare_metrics

    record = json.loads((uninterrupted / "metrics.json").read_text())
    record["val/loss"] += 1e-9

    diffs = [k for k, _, _, ok in compare_metrics(record, json.loads((out / "metrics.json").read_text()), 0) if not ok]
    assert diffs == ["val/loss"]
