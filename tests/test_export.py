"""``lora_exp.export``: a merged HF folder that plain transformers loads, with the logits of base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import compose, run_cli
from lora_exp.inference.export import EXPORT_FILE

IDS = torch.tensor([[1, 400, 5000, 77, 9, 12000, 3, 42]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_merged_folder_loads_in_plain_transformers_with_the_adapter_logits(tiny_run: Path, tmp_path: Path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    proc = run_cli("lora_exp.export", f"run_dir={tiny_run}", f"out={out}", "dtype=float32", cwd=tmp_path)
    assert "largest |logit difference|" in proc.stdout
    record = json.loads((out / EXPORT_FILE).read_text())
    assert record["max_abs_logit_diff/merged_float32"] < 1e-5
    assert record["max_abs_logit_diff/saved_float32"] < 1e-5

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    unmerged = AutoPeftModelForCausalLM.from_pretrained(tiny_run / "adapter").eval()
    torch.testing.assert_close(_logits(merged), _logits(unmerged), rtol=0, atol=1e-5)
    assert not any("lora" in k for k in load_file(out / "model.safetensors"))
    assert AutoTokenizer.from_pretrained(out).chat_template

    again = run_cli("lora_exp.export", f"run_dir={tiny_run}", f"out={out}", cwd=tmp_path, check=False)
    assert again.returncode == 2 and "overwrite=true" in again.stderr


@pytest.fixture
def qlora_run(tmp_path: Path) -> Path:
    """A run directory of a QLoRA (nf4) config with a non-zero adapter, built without training."""
    from peft import get_peft_model

    from lora_exp.model import lora
    from lora_exp.model.load import load_base_model, resolve_model_folder

    run_dir = tmp_path / "qlora_run"
    cfg = compose("model=tiny_llama", "quant=nf4", run_dir=run_dir)
    folder = resolve_model_folder(cfg.model)
    config = lora.peft_config(cfg.lora)
    config.init_lora_weights = False  # random A and B: the adapter changes the logits
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(cfg.model, folder), config)
    model.save_pretrained(run_dir / "adapter")
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)
    return run_dir


def test_qlora_adapter_merges_into_the_dequantized_base(qlora_run: Path, tmp_path: Path):
    """The merged model stays close to the 4-bit model the adapter belongs to and is not quantized."""
    from transformers import AutoModelForCausalLM

    proc = run_cli("lora_exp.export", f"run_dir={qlora_run}", cwd=tmp_path)
    assert "nf4" in proc.stdout
    out = qlora_run / "merged"
    record = json.loads((out / EXPORT_FILE).read_text())
    assert record["quant"] == "nf4"
    # bf16 compute in the 4-bit model; without undoing bitsandbytes' CPU repacking this was ~0.8
    assert record["max_abs_logit_diff/merged_float32"] < 0.02 * record["logit_scale"] + 0.02
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert AutoModelForCausalLM.from_pretrained(out).model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


@pytest.mark.slow
def test_default_model_export_parity(default_run: Path, tmp_path: Path):
    """SmolLM2 + adapter merged in float32 and saved in bf16 (export's dtype=): logits as before the merge."""
    out = tmp_path / "merged"
    run_cli("lora_exp.export", f"run_dir={default_run}", f"out={out}", "dtype=bfloat16", cwd=tmp_path)
    record = json.loads((out / EXPORT_FILE).read_text())
    assert record["dtype"] == "bfloat16"
    assert record["max_abs_logit_diff/merged_float32"] < 1e-3
    assert record["max_abs_logit_diff/saved_bfloat16"] < 0.05 * record["logit_scale"]
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
