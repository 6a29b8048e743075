"""``reproduce`` refuses unfinished runs; a non-finite loss stops a run cleanly (with W&B unreachable)."""

from __future__ import annotations

import json

from conftest import run_cli, train_cli

FAKE_KEY = "f" * 8 + "0123456789abcdef0123456789abcdef"  # a W&B key that must never be written anywhere


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
        "model=tiny_llama",
        "trainer.accelerator=cpu",
        "trainer.limit_val_batches=0",
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
