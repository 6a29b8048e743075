"""quant=nf4|int8: bitsandbytes quantizes the tiny Llama on the CPU, and QLoRA trains there for real."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose, train_cli
from lora_exp import metrics as M
from lora_exp.config.validate import validate
from lora_exp.errors import ConfigError
from lora_exp.model import lora
from lora_exp.model.load import load_base_model, resolve_model_folder
from lora_exp.model.precision import resolve_dtype

bnb = pytest.importorskip("bitsandbytes")

LAYER = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


def _wrapped(*overrides):
    cfg = compose("model=tiny_llama", *overrides)
    return cfg, lora.wrap(load_base_model(cfg.model, resolve_model_folder(cfg.model), cfg.quant), cfg.lora)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantized_base_counts_params_as_peft_does_and_as_unquantized(mode):
    _, plain = _wrapped()
    cfg, model = _wrapped(f"quant={mode}")
    layers = [m for m in model.modules() if isinstance(m, LAYER[mode])]
    # all 7 projections of every layer are quantized (LoRA wraps q,k,v,o and holds them as base_layer)
    assert len(layers) == 7 * cfg.model.config.num_hidden_layers
    if mode == "nf4":
        weight = layers[0].weight
        assert weight.dtype == torch.uint8 and weight.quant_type == "nf4" and weight.compress_statistics
        # quant.bnb.bnb_4bit_compute_dtype=auto: bf16 where the device has it natively, else fp32 on a CPU
        assert layers[0].compute_dtype == getattr(torch, resolve_dtype("auto"))
    else:
        assert layers[0].weight.dtype == torch.int8
    # 4-bit weights pack two values per byte: a naive numel() undercounts, PEFT does not
    trainable, total = lora.param_counts(model)
    assert (trainable, total) == lora.param_counts(plain)
    if mode == "nf4":
        assert sum(p.numel() for p in model.parameters()) < total
    # k-bit preparation: nothing but the adapter trains, and it trains in fp32
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_qlora_trains_on_cpu_through_the_cli(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    train_cli(run_dir, "model=tiny_llama", "debug=quick", "quant=nf4", "optim.lr=5e-3", "logger=none", "data.num_val=8")
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record[M.STATUS] == M.STATUS_COMPLETED and record[M.STEPS] == 4
    assert record[M.VAL_LOSS] < record[M.base(M.VAL_LOSS)] - 0.01, "QLoRA did not learn"
    cfg, plain = _wrapped()
    assert (record[M.TRAINABLE_PARAMS], record[M.TOTAL_PARAMS]) == lora.param_counts(plain)

    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == cfg.lora.r
    # the adapter is an ordinary LoRA adapter: it loads on the unquantized base too
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    assert all(torch.count_nonzero(p) > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_int8_trains_in_process(tmp_path):
    from lora_exp.training.run import train

    cfg = compose(
        "model=tiny_llama",
        "debug=quick",
        "quant=int8",
        "logger=none",
        "callbacks=none",
        "optim.lr=5e-3",
        "trainer.max_steps=2",
        "optim.warmup_ratio=0",
        "data.num_val=8",
        run_dir=tmp_path,
    )
    record = train(cfg)
    assert record[M.STATUS] == M.STATUS_COMPLETED
    assert record[M.VAL_LOSS] < record[M.base(M.VAL_LOSS)]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quant=nf4", "quant.mode=nf3"], "quant.mode='nf3'"),
        (["quant=nf4", "quant.bnb.bnb_4bit_compute_dtype=int4"], "quant.bnb.bnb_4bit_compute_dtype='int4'"),
        (["model.backend=unsloth"], "model.backend=unsloth"),
        (["model.backend=vllm"], "model.backend='vllm'"),
        (["optim=loraplus", "optim.loraplus_lr_ratio=0.5"], "optim.loraplus_lr_ratio=0.5"),
    ],
)
def test_bad_scale_settings_name_the_key(overrides, message, tmp_path):
    if "model.backend=unsloth" in overrides and torch.cuda.is_available():
        pytest.importorskip("unsloth", reason="with CUDA and Unsloth installed, unsloth is valid")
        pytest.skip("unsloth is valid here")
    with pytest.raises(ConfigError) as err:
        validate(compose(*overrides, run_dir=tmp_path))
    assert message in str(err.value)


def test_unsloth_backend_without_cuda_exits_2_with_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from conftest import run_cli

    proc = run_cli(
        "lora_exp.train",
        "model=tiny_llama",
        "model.backend=unsloth",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2
    assert "model.backend=unsloth needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_unsloth_backend_trains_on_gpu(tmp_path):
    pytest.importorskip("unsloth")
    run_dir = tmp_path / "run"
    train_cli(run_dir, "model=tiny_llama", "debug=quick", "model.backend=unsloth", "quant=nf4")
    assert json.loads((run_dir / "metrics.json").read_text())[M.STATUS] == M.STATUS_COMPLETED
