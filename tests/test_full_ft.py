"""Full fine-tuning (``method=full``) as a baseline in the same harness as LoRA, on the tiny random Llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import OFFLINE_ENV, compose, run_cli, train_cli
from lora_exp.model.precision import Device, choose, resolve

FULL_RUN = (
    "method=full",
    "model=tiny_llama",
    "debug=quick",
    "logger=none",
    "checkpoint.every_n_steps=2",
    "trainer.enable_progress_bar=false",
)

CUDA_BF16 = Device("cuda", "NVIDIA H100", True, "9.0")
CUDA_FP16 = Device("cuda", "Tesla T4", False, "7.5")
CPU_BF16 = Device("cpu", "Xeon (Sapphire Rapids)", True, "AVX512")
CPU_AVX2 = Device("cpu", "EPYC", False, "AVX2")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """Four steps of full fine-tuning through the public CLI, checkpointing every 2 steps."""
    run_dir = tmp_path_factory.mktemp("full") / "run"
    train_cli(run_dir, *FULL_RUN)
    return run_dir


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_auto_dtype_keeps_fp32_master_weights_for_full_fine_tuning():
    # every device: the trained weights are fp32; the matmuls keep the device's autocast
    expected = {
        CUDA_BF16: "bf16-mixed",
        CUDA_FP16: "16-mixed",
        CPU_BF16: "bf16-mixed",
        CPU_AVX2: "32-true",
    }
    for device, precision in expected.items():
        c = choose(device, full_weights=True)
        assert (c.model_dtype, c.trainer_precision) == ("float32", precision), device
    assert choose(CUDA_BF16).model_dtype == "bfloat16"  # LoRA keeps a half-precision frozen base
    assert choose(CUDA_BF16, model_dtype="bfloat16", full_weights=True).model_dtype == "bfloat16"  # explicit wins
    cfg = compose("method=full")  # the default model's dtype is auto
    resolve(cfg, CUDA_BF16)
    assert (cfg.model.dtype, cfg.trainer.precision) == ("float32", "bf16-mixed")
    cfg = compose()
    resolve(cfg, CUDA_BF16)
    assert cfg.model.dtype == "bfloat16"


def test_full_fine_tuning_trains_every_weight_and_saves_a_plain_model(full_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_exp.model.load import resolve_model_folder

    record = json.loads((full_run / "metrics.json").read_text())
    assert record["status"] == "completed"
    assert record["method"] == "full"
    assert record["trainable_params"] == record["total_params"] > 3_000_000
    assert "lora/scaling" not in record and "lora/target_modules" not in record
    assert record["val/loss"] < record["base/val/loss"]  # the held-out split, before and after
    assert record["trainer/global_step"] == 4
    assert not (full_run / "adapter").exists()

    # a plain HF folder: transformers alone loads the model and the tokenizer, offline
    model = AutoModelForCausalLM.from_pretrained(full_run / "model")
    tokenizer = AutoTokenizer.from_pretrained(full_run / "model")
    assert tokenizer.pad_token_id is not None
    assert model.config.use_cache  # generation from the saved folder keeps the KV cache
    assert next(model.parameters()).dtype == torch.float32
    # every weight moved away from the base it started from (same architecture and init seed)
    base = _tensors(Path(resolve_model_folder(compose("model=tiny_llama").model)))
    trained = _tensors(full_run / "model")
    assert trained.keys() == base.keys()
    unchanged = [k for k in base if torch.equal(base[k], trained[k])]
    assert not unchanged, f"weights not trained: {unchanged}"

    # checkpoints hold every weight (and the optimizer's state for each), not an adapter
    ckpt = torch.load(full_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    names = {f"model.{n}" for n, _ in model.named_parameters()}
    assert set(ckpt["state_dict"]) == names
    assert len(ckpt["optimizer_states"][0]["state"]) == len(names)
    for name, value in trained.items():
        key = f"model.{name}"
        if key in ckpt["state_dict"]:
            assert torch.equal(ckpt["state_dict"][key], value), name

    run_json = json.loads((full_run / "run.json").read_text())
    assert len(run_json["model_sha256"]) == 64


def test_adapter_commands_name_a_full_fine_tune(full_run, tmp_path):
    proc = run_cli("lora_exp.evaluate", f"run_dir={full_run}", cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "full fine-tune (method=full)" in proc.stderr
    assert str(full_run / "model") in proc.stderr


KILL_AFTER_STEP = r"""
import os, signal, sys
from lora_exp.training import callbacks

end = callbacks.Throughput.on_train_batch_end
def on_train_batch_end(self, trainer, *args, **kwargs):
    end(self, trainer, *args, **kwargs)
    if trainer.global_step == int(os.environ["KILL_AFTER_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
callbacks.Throughput.on_train_batch_end = on_train_batch_end

from lora_exp.train import main
sys.argv = ["lora_exp/train.py", *sys.argv[1:]]
main()
"""


def test_killed_full_fine_tune_resumes_to_the_same_weights(full_run, tmp_path):
    import torch

    script = tmp_path / "killer.py"
    script.write_text(KILL_AFTER_STEP)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(script), *FULL_RUN, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, **OFFLINE_ENV, "KILL_AFTER_STEP": "3"},
        timeout=600,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (run_dir / "model").exists()
    resumed = train_cli(run_dir, *FULL_RUN, "resume=true")
    assert "resuming from" in resumed.stdout + resumed.stderr
    record = json.loads((run_dir / "metrics.json").read_text())
    assert (record["status"], record["trainer/global_step"]) == ("completed", 4)
    reference, again = _tensors(full_run / "model"), _tensors(run_dir / "model")
    assert all(torch.equal(reference[k], again[k]) for k in reference)  # from step 2's checkpoint to the same end
    assert record["val/loss"] == json.loads((full_run / "metrics.json").read_text())["val/loss"]


def test_full_fine_tuning_refuses_a_quantized_base_and_lora_settings(tmp_path):
    proc = train_cli(tmp_path / "run", "method=full", "model=tiny_llama", "quant=nf4", "lora.r=8", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "method=full with quant=nf4" in proc.stderr
    assert "method=full ignores the LoRA settings lora.r" in proc.stderr
    assert not (tmp_path / "run" / "model").exists()
