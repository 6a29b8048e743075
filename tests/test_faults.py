"""Faults an adversarial user or a shared cluster brings, each through the public commands.

Run-directory ownership (a lock, a finished run never overwritten or mixed), output folders that
are never someone else's, signals (SIGTERM / SIGINT: a resumable checkpoint, ``interrupted``,
143 / 130), disk faults (injected ``OSError`` at the write, a truly read-only path), secrets kept
off disk, and the smaller cases of issue 16. Every case checks: one clear line, no traceback,
nothing lost, nothing silently wrong. Tiny model, a few steps, no W&B server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import OFFLINE_ENV, run_cli, train_cli
from lora_exp import metrics as M

FAST = (
    "model=tiny_llama",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "logger=none",
    "data.num_train=8",
    "data.num_val=4",
    "data.batch_size=4",
    "trainer.max_steps=2",
    "trainer.max_epochs=4",
    "trainer.limit_val_batches=0",
    "optim.warmup_steps=0",
    "trainer.enable_progress_bar=false",
)

# the overrides of the completed run every test shares (the W&B logger, offline, no samples)
DONE = (*FAST, "logger=wandb", "logger.wandb.num_samples=0")

# The real command with one fault injected (FAULT=kind:arg), as a user's process would meet it.
INJECT = r"""
import errno, os, signal, sys
kind, _, arg = os.environ.get("FAULT", "").partition(":")

if kind in ("sigterm_after_step", "sigint_after_step"):
    from lora_exp.training import callbacks
    sig = signal.SIGTERM if kind == "sigterm_after_step" else signal.SIGINT
    end = callbacks.Throughput.on_train_batch_end
    def on_train_batch_end(self, trainer, *a, **k):
        end(self, trainer, *a, **k)
        if trainer.global_step == int(arg):
            os.kill(os.getpid(), sig)
    callbacks.Throughput.on_train_batch_end = on_train_batch_end

if kind == "sigint_in_validation":
    import time
    from lora_exp.training import module
    step = module.LoraModule.validation_step
    def validation_step(self, *a, **k):
        if not getattr(module, "_sent", False):
            module._sent = True
            print(f"SIGNAL_SENT_AT {time.time()}", flush=True)
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, *a, **k)
    module.LoraModule.validation_step = validation_step

if kind == "enospc_checkpoint":  # the n-th checkpoint write finds the disk full halfway
    import torch
    real_save, calls = torch.save, [0]
    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == int(arg) and hasattr(f, "write"):
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)
    torch.save = save

if kind == "erofs_adapter":  # the adapter's weights file cannot be written
    import peft.peft_model, peft.utils.save_and_load
    def refuse(tensors, filename, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), filename)
    peft.peft_model.safe_save_file = refuse

from lora_exp.train import main
sys.argv = ["lora_exp/train.py", *sys.argv[1:]]
main()
"""


def train_with_fault(tmp_path: Path, run_dir: Path, fault: str, *overrides: str, **env: str):
    script = tmp_path / "inject.py"
    script.write_text(INJECT)
    return subprocess.run(
        [sys.executable, str(script), *overrides, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV, "FAULT": fault, **env},
        timeout=600,
    )


def clear_error(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The process exited with ``code`` and said why in one ``error:`` line, with no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    return proc.stderr


def digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (relative names): a run directory's exact contents."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.suffix != ".log"
    }


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def no_temp_files(run_dir: Path) -> None:
    leftovers = [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    """A completed tiny run, trained with ``WANDB_MODE=`` (empty) and the W&B logger: an empty value is unset."""
    run_dir = tmp_path_factory.mktemp("faults") / "done"
    train_cli(run_dir, *DONE, env={"WANDB_MODE": ""})
    assert metrics(run_dir)["status"] == "completed"
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert not (run_dir / ".lock").exists()  # released on exit
    return run_dir


# ------------------------------------------------------------------------------ run-directory ownership


def test_a_live_lock_stops_a_second_process_at_once_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_dir = tmp_path / "busy"
        run_dir.mkdir()
        lock = {"pid": holder.pid, "host": socket.gethostname(), "since": "now"}
        (run_dir / ".lock").write_text(json.dumps(lock))
        started = time.time()
        err = clear_error(train_cli(run_dir, *FAST, check=False))
        assert time.time() - started < 60 and f"process {holder.pid}" in err and "in use" in err
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # not even .hydra/ was written
    finally:
        holder.kill()
        holder.wait()


def test_a_finished_run_is_never_overwritten_by_a_new_or_a_failing_run(done):
    before = digest(done)
    for extra in (("seed=1",), ("lora.dropout=1.5",)):  # a different run; a run that would fail validation
        err = clear_error(train_cli(done, *FAST, *extra, check=False))
        assert "already holds a run" in err and "resume=true" in err and "overwrite=true" in err
    assert digest(done) == before  # metrics.json, run.json, .hydra/, adapter, checkpoints: byte for byte


def test_resume_of_a_completed_run_skips_it_and_keeps_its_hydra_files(done):
    before = digest(done)
    proc = train_cli(done, *DONE, "resume=true")
    assert "already completed" in proc.stdout
    assert digest(done) == before


def test_overwrite_moves_the_old_run_aside_intact_and_max_steps_0_is_refused(done, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(done, run_dir)
    before = digest(run_dir)
    err = clear_error(train_cli(run_dir, *FAST, "overwrite=true", "trainer.max_steps=0", check=False))
    assert "trainer.max_steps=0" in err and "would not train" in err
    (moved,) = tmp_path.glob("run.old-*")
    assert digest(moved) == before  # moved aside whole, nothing mixed, nothing deleted
    assert not (run_dir / "metrics.json").exists()  # and no `completed` untrained run in its place


def test_a_sweep_with_failed_points_exits_non_zero_and_lists_each(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("lora_exp.train", "-m", *FAST, "lora.r=0,-3", f"hydra.sweep.dir={sweep}", cwd=tmp_path, check=False)
    err = clear_error(proc, code=1)
    assert "2 sweep point(s) failed" in err
    for point, value in (("0", "lora.r=0"), ("1", "lora.r=-3")):
        (line,) = [ln for ln in err.splitlines() if ln.strip().startswith(str(sweep / point))]
        assert "failed" in line and value in line


# ------------------------------------------------------------------------------------ output folders


def test_export_never_writes_into_or_over_a_run_directory(done, tmp_path):
    before = digest(done)
    for out, extra in ((done, ()), (done, ("overwrite=true",)), (done.parent, ("overwrite=true",))):
        proc = run_cli("lora_exp.export", f"run_dir={done}", f"out={out}", *extra, cwd=tmp_path, check=False)
        assert "run directory" in clear_error(proc)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = run_cli("lora_exp.export", f"run_dir={done}", f"out={foreign}", "overwrite=true", cwd=tmp_path, check=False)
    assert "did not write" in clear_error(proc)
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert digest(done) == before


def test_export_overwrite_replaces_only_its_own_previous_export(done, tmp_path):
    out = tmp_path / "merged"
    run_cli("lora_exp.export", f"run_dir={done}", f"out={out}", cwd=tmp_path)
    first = (out / "lora_exp_export.json").stat().st_mtime_ns
    assert "overwrite=true" in clear_error(
        run_cli("lora_exp.export", f"run_dir={done}", f"out={out}", cwd=tmp_path, check=False)
    )
    run_cli("lora_exp.export", f"run_dir={done}", f"out={out}", "overwrite=true", cwd=tmp_path)
    assert (out / "lora_exp_export.json").stat().st_mtime_ns != first and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temporary folder left


def test_safe_output_dir_is_the_rule_for_every_output_folder(done, tmp_path):
    from lora_exp.runs.outputs import OutputDirError, safe_output_dir

    assert safe_output_dir(tmp_path / "new", "marker.json", False) == (tmp_path / "new").resolve()
    with pytest.raises(OutputDirError, match="run directory"):
        safe_output_dir(done / "adapter" / "..", "marker.json", True, option="--out")


# ------------------------------------------------------------------------------------------- signals


@pytest.mark.parametrize(("signal_name", "code", "resume"), [("SIGTERM", 143, True), ("SIGINT", 130, False)])
def test_a_signal_stops_at_a_step_boundary_with_a_checkpoint_and_resume_finishes(tmp_path, signal_name, code, resume):
    """Stopped mid-epoch 1 (2 batches an epoch) at step 3 of 4: checkpoint of step 3, exit 128 + signal."""
    run_dir = tmp_path / "run"
    fault = f"{signal_name.lower()}_after_step:3"
    proc = train_with_fault(tmp_path, run_dir, fault, *FAST, "trainer.max_steps=4", "checkpoint.every_n_steps=50")
    err = clear_error(proc, code=code)
    assert f"interrupted by {signal_name} at step 3" in err and "resume=true" in err
    record = metrics(run_dir)
    assert record["status"] == "interrupted" and record[M.STOP_REASON] == signal_name and record[M.STEPS] == 3
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3  # the state at the stop, though no scheduled save was due
    assert not (run_dir / "adapter").exists()  # an interrupted run has no adapter that looks final
    assert not (run_dir / ".lock").exists()
    if not resume:
        return
    proc = train_cli(run_dir, *FAST, "trainer.max_steps=4", "checkpoint.every_n_steps=50", "resume=true")
    assert "resuming from" in proc.stdout + proc.stderr
    record = metrics(run_dir)
    assert record["status"] == "completed" and record[M.STEPS] == 4
    steps = [
        r["step"] for r in map(json.loads, (run_dir / "history.jsonl").read_text().splitlines()) if "train/loss" in r
    ]
    assert len(steps) == len(set(steps))


def test_sigint_during_validation_stops_promptly_with_exit_130(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in FAST if not o.startswith("trainer.limit_val_batches")]
    proc = train_with_fault(tmp_path, run_dir, "sigint_in_validation", *overrides, "data.eval_batch_size=1")
    err = clear_error(proc, code=130)
    sent = float(proc.stdout.split("SIGNAL_SENT_AT ")[1].split()[0])
    assert "interrupted by SIGINT before training" in err or "interrupted by SIGINT at step 0" in err
    assert time.time() - sent < 60  # after one batch, not the whole validation set
    assert metrics(run_dir)["status"] == "interrupted"


# --------------------------------------------------------------------------------------- disk faults


def test_disk_full_at_a_checkpoint_keeps_the_last_good_one_and_leaves_no_temp_file(tmp_path):
    from lora_exp.training.resume import latest_checkpoint

    run_dir = tmp_path / "run"
    # step 1 saves step000001.ckpt and last.ckpt (2 writes); the 3rd write (step 2) finds the disk full
    proc = train_with_fault(tmp_path, run_dir, "enospc_checkpoint:3", *FAST, "checkpoint.every_n_steps=1")
    err = clear_error(proc)
    assert "No space left on device" in err and str(run_dir / "checkpoints") in err
    assert len([ln for ln in err.splitlines() if "error:" in ln]) == 1
    record = metrics(run_dir)
    assert record["status"] == "failed" and "No space left on device" in record["error"]
    no_temp_files(run_dir)
    assert torch.load(latest_checkpoint(run_dir / "checkpoints"), weights_only=True)["global_step"] == 1


def test_read_only_adapter_folder_is_one_line_and_leaves_no_half_adapter(tmp_path):
    run_dir = tmp_path / "run"
    proc = train_with_fault(tmp_path, run_dir, "erofs_adapter", *FAST)
    err = clear_error(proc)
    assert "Read-only file system" in err and "cannot write" in err
    assert metrics(run_dir)["status"] == "failed" and "Read-only" in metrics(run_dir)["error"]
    assert not (run_dir / "adapter").exists()
    no_temp_files(run_dir)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()  # the trained state is kept: resume can save it


def test_a_run_directory_that_cannot_be_created_is_one_line_naming_it(tmp_path):
    # /sys refuses new folders even to root: a real read-only place, no injection
    err = clear_error(train_cli(Path("/sys/lora_exp_fault/run"), *FAST, cwd=tmp_path, check=False))
    assert "cannot write /sys/lora_exp_fault" in err


# ---------------------------------------------------------------------------------------------- secrets

SECRET = "sk-" + "s3cr3t" * 6


@pytest.mark.parametrize(
    ("override", "env"),
    [
        (f"+logger.api_key={SECRET}", {}),  # a secret-looking key
        (f"+data.note={SECRET}", {"WANDB_API_KEY": SECRET}),  # the value of $WANDB_API_KEY under another key
        ("+data.note=hf_short", {"HF_TOKEN": "hf_short"}),  # equal to $HF_TOKEN, however short
    ],
)
def test_a_refused_secret_never_stays_on_disk(tmp_path, override, env):
    run_dir = tmp_path / "run"
    err = clear_error(train_cli(run_dir, *FAST, override, check=False, env=env))
    secret = override.split("=", 1)[1]
    assert "secret" in err and secret not in err
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "overrides.yaml" for p in files)  # Hydra wrote its files; they were redacted
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


# ---------------------------------------------------------------------------------------- smaller cases


def test_unreadable_checkpoints_restart_with_a_warning_and_no_duplicate_history(done, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(done, run_dir)
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "metrics.json").write_text(
        (run_dir / "metrics.json").read_text().replace('"completed"', '"interrupted"')
    )
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        ckpt.write_bytes(b"not a checkpoint")
    proc = train_cli(run_dir, *DONE, "resume=true", env={"WANDB_MODE": ""})
    assert "WARNING" in proc.stderr + proc.stdout and "no readable checkpoint" in proc.stderr + proc.stdout
    assert metrics(run_dir)["status"] == "completed"
    rows = [json.loads(ln) for ln in (run_dir / "history.jsonl").read_text().splitlines()]
    keys = [(r["step"], tuple(sorted(r))) for r in rows]
    assert len(keys) == len(set(keys)), keys


def test_reproduce_compares_with_the_recorded_sha256_when_the_adapter_was_deleted(done, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(done, run_dir)
    shutil.rmtree(run_dir / "adapter")
    proc = run_cli("lora_exp.reproduce", str(run_dir), "--out", str(tmp_path / "again"), cwd=tmp_path)
    assert "REPRODUCED" in proc.stdout and "NOT REPRODUCED" not in proc.stdout
    assert "run.json records" in proc.stdout


def test_generate_refuses_an_empty_prompt(done, tmp_path):
    err = clear_error(run_cli("lora_exp.generate", f"run_dir={done}", "prompt=", cwd=tmp_path, check=False))
    assert "prompt is empty" in err
