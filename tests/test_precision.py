"""``auto`` precision, attention and loss: every branch of the rule, by faking the device."""

from __future__ import annotations

import json
import logging

import pytest
from hydra import compose, initialize_config_dir

from lora_exp.config import config_dir
from lora_exp.model import precision
from lora_exp.model.precision import Device, choose

CUDA_BF16 = Device("cuda", "NVIDIA H100", True, "9.0")
CUDA_FP16 = Device("cuda", "Tesla T4", False, "7.5")
CPU_BF16 = Device("cpu", "Xeon (Sapphire Rapids)", True, "AVX512")
CPU_AVX2 = Device("cpu", "EPYC", False, "AVX2")


@pytest.mark.parametrize(
    ("device", "dtype", "trainer_precision", "compute"),
    [
        (CUDA_BF16, "bfloat16", "bf16-mixed", "bfloat16"),
        (CUDA_FP16, "float16", "16-mixed", "float16"),
        (CPU_BF16, "bfloat16", "bf16-mixed", "bfloat16"),
        (CPU_AVX2, "float32", "32-true", "float32"),
    ],
    ids=["cuda-bf16", "cuda-fp16-only", "cpu-native-bf16", "cpu-avx2"],
)
def test_auto_follows_the_device(device, dtype, trainer_precision, compute):
    c = choose(device, quant_compute_dtype="auto", quantized=True)
    assert (c.model_dtype, c.trainer_precision, c.quant_compute_dtype) == (dtype, trainer_precision, compute)
    assert set(c.auto_keys) >= {"model.dtype", "trainer.precision", "quant.bnb.bnb_4bit_compute_dtype"}
    record = c.record()
    assert record["precision/model_dtype"] == dtype and record["hardware/bf16"] == device.bf16
    assert f"model.dtype={dtype}" in c.line() and f"trainer.precision={trainer_precision}" in c.line()


def test_explicit_values_win_and_forcing_bf16_on_a_cpu_without_it_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="lora_exp.model.precision"):
        c = choose(CPU_AVX2, model_dtype="bfloat16", trainer_precision="bf16-mixed")
    assert (c.model_dtype, c.trainer_precision, c.auto_keys[:2]) == (
        "bfloat16",
        "bf16-mixed",
        ("model.attn_implementation", "loss.impl"),
    )
    warnings = [r for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(warnings) == 1 and "model.dtype and trainer.precision" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_exp.model.precision"):
        choose(CPU_BF16, model_dtype="bfloat16", trainer_precision="bf16-mixed")
        choose(CPU_AVX2, model_dtype="float32", trainer_precision="32-true")
    assert not caplog.records


def test_attention_and_loss(monkeypatch):
    import importlib.util

    installed = {"flash_attn", "liger_kernel"}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n in installed else real(n, *a))
    gpu = choose(CUDA_BF16)
    assert (gpu.attn_implementation, gpu.loss_impl) == ("flash_attention_2", "liger")
    cpu = choose(CPU_BF16)  # installed or not, the CPU keeps sdpa (+ the per-example fast path) and chunked
    assert (cpu.attn_implementation, cpu.loss_impl) == ("sdpa", "chunked")
    installed.clear()
    assert (choose(CUDA_FP16).attn_implementation, choose(CUDA_FP16).loss_impl) == ("sdpa", "chunked")
    assert choose(CUDA_BF16, attn_implementation="eager", loss_impl="full").loss_impl == "full"


@pytest.mark.parametrize(
    ("flags", "forced", "expected"),
    [
        ("avx2 fma", None, False),
        ("avx512f avx512_bf16", None, True),
        ("amx_bf16 amx_tile", None, True),
        ("avx2", "1", True),
        ("avx512_bf16", "0", False),
    ],
)
def test_cpu_detection(monkeypatch, flags, forced, expected):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: set(flags.split()))
    if forced is None:
        monkeypatch.delenv("LORA_EXP_CPU_BF16", raising=False)
    else:
        monkeypatch.setenv("LORA_EXP_CPU_BF16", forced)
    assert precision.cpu_has_native_bf16() is expected


def _compose(*overrides):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("device", [CUDA_BF16, CUDA_FP16, CPU_BF16, CPU_AVX2], ids=lambda d: d.name)
def test_resolve_rewrites_the_composed_config(device, monkeypatch):
    monkeypatch.setattr(precision, "detect", lambda accelerator="auto": device)
    cfg = _compose("quant=nf4")
    assert (cfg.model.dtype, cfg.trainer.precision, cfg.quant.bnb.bnb_4bit_compute_dtype) == ("auto",) * 3
    c = precision.resolve(cfg)
    assert cfg.model.dtype == c.model_dtype and cfg.trainer.precision == c.trainer_precision
    assert cfg.quant.bnb.bnb_4bit_compute_dtype == c.quant_compute_dtype
    assert precision.resolve(cfg).auto_keys == ()  # a resolved config stays as it is


def test_plan_resolves_for_its_target_device():
    from lora_exp.planning.planner import make_plan

    fp16 = _compose("plan.bf16=false")
    make_plan(fp16)
    assert (fp16.model.dtype, fp16.trainer.precision) == ("float16", "16-mixed")
    bf16 = _compose()
    make_plan(bf16)
    assert (bf16.model.dtype, bf16.trainer.precision) == ("bfloat16", "bf16-mixed")


@pytest.mark.parametrize("native", ["0", "1"], ids=["cpu-no-bf16", "cpu-bf16"])
def test_a_run_prints_and_records_its_choice(tmp_path, native):
    """Both CPU branches through the CLI; the bf16 branch only resolves here (tiny model, 2 steps)."""
    from conftest import run_cli

    run = tmp_path / "run"
    proc = run_cli(
        "lora_exp.train",
        "debug=quick",
        "model=tiny_llama",
        "model.dtype=auto",
        "logger=none",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
        env={"LORA_EXP_CPU_BF16": native},
    )
    dtype, prec = ("bfloat16", "bf16-mixed") if native == "1" else ("float32", "32-true")
    first = next(line for line in proc.stdout.splitlines() if line.startswith("device:"))
    assert f"model.dtype={dtype} trainer.precision={prec}" in first
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["precision/model_dtype"], metrics["precision/trainer"]) == (dtype, prec)
    assert metrics["hardware/bf16"] is (native == "1")
    saved = json.loads((run / "run.json").read_text())
    assert saved["config"]["model"]["dtype"] == dtype and saved["config"]["trainer"]["precision"] == prec
