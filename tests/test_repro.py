"""Bitwise repeats and ``python -m lora_exp.reproduce``; run.json; a non-finite loss; secrets stay out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, train_cli

FAKE_KEY = "f" * 8 + "0123456789abcdef0123456789abcdef"  # a W&B key that must never be written anywhere
RUN = (
    "model=tiny_llama",
    "logger=csv",
    "trainer.precision=32-true",
    "data.num_train=16",
    "data.num_val=8",
    "trainer.max_steps=3",
    "optim.warmup_steps=1",
    "trainer.enable_progress_bar=false",
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("repro") / "run"
    train_cli(run_dir, *RUN, env={"WANDB_API_KEY": FAKE_KEY, "HF_TOKEN": "hf_" + "x" * 30})
    return run_dir


def test_run_json_fingerprints_the_run(finished):
    from lora_exp.rundir import adapter_hash

    run = json.loads((finished / "run.json").read_text())
    assert run["command"][:3] == ["python", "-m", "lora_exp.train"] and run["seed"] == 0
    assert set(run["overrides"]) == set(RUN)
    assert run["git"]["commit"] and isinstance(run["git"]["dirty"], bool)
    assert {"python", "torch", "transformers", "peft", "lightning", "hydra-core", "bitsandbytes", "wandb"} <= set(
        run["packages"]
    )
    assert run["hardware"]["cpu_count"] >= 1 and run["hardware"]["gpu_count"] == 0
    assert run["data_fingerprint"] and len(run["initial_adapter_sha256"]) == 64
    assert run["model_fingerprint"]["files"]["model.safetensors"]
    assert run["adapter_sha256"] == adapter_hash(finished)
    freeze = (finished / "pip-freeze.txt").read_text()
    assert "torch==" in freeze and "peft==" in freeze


def test_secrets_never_reach_the_run_directory(finished):
    for path in finished.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert FAKE_KEY.encode() not in data and b"hf_xxxxxxxx" not in data, path


def test_reproduce_repeats_the_run_bit_for_bit(finished, tmp_path):
    out = tmp_path / "again"
    proc = run_cli("lora_exp.reproduce", str(finished), "--out", str(out), cwd=tmp_path)
    assert "REPRODUCED" in proc.stdout and "adapter: identical" in proc.stdout
    a = (finished / "adapter" / "adapter_model.safetensors").read_bytes()
    b = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert a == b  # same config and seed on CPU: identical adapter bytes
    report = json.loads((out / "reproduce.json").read_text())
    assert report["matches"] and report["mismatched_metrics"] == []
    # the smallest difference in a result counts on CPU
    from lora_exp.reproduce import compare_metrics

    record = json.loads((finished / "metrics.json").read_text())
    record["val/loss"] += 1e-9

    diffs = [k for k, _, _, ok in compare_metrics(record, json.loads((out / "metrics.json").read_text()), 0) if not ok]
    assert diffs == ["val/loss"]


def test_reproduce_refuses_an_unfinished_run(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "running", "pid": 999999999}))
    proc = run_cli("lora_exp.reproduce", str(tmp_path), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "'interrupted'" in proc.stderr and "Traceback" not in proc.stderr


def test_non_finite_loss_stops_with_the_last_good_adapter(tmp_path):
    """lr=1e30 blows the adapter up within steps; W&B is 'logged in' to a server nobody answers."""
    run_dir = tmp_path / "nan"
    env = {"WANDB_API_KEY": FAKE_KEY, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_MODE": "online"}
    proc = train_cli(
        run_dir,
        *RUN[:1],
        "logger=wandb",
        "logger.wandb.num_samples=0",
        "trainer.precision=32-true",
        "data.num_train=16",
        "data.num_val=8",
        "trainer.max_steps=6",
        "trainer.max_epochs=3",
        "checkpoint.every_n_steps=1",
        "optim.warmup_steps=0",
        "optim.lr=1e30",
        "trainer.enable_progress_bar=false",
        env=env,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "non-finite training loss" in proc.stderr and "Traceback" not in proc.stderr
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "failed" and record["stop_reason"] == "non_finite_loss"
    assert "non-finite" in record["error"]
    # the adapter saved is the newest checkpoint's, and it is finite
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(t.isfinite().all() for t in weights.values())
    # W&B unreachable: one warning, the run went on offline
    out = proc.stdout + proc.stderr
    assert out.count("W&B server unreachable") == 1
    assert list((run_dir / "wandb").glob("offline-run-*"))
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
