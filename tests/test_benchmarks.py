"""The benchmarks' own logic: MFU arithmetic, GPU peaks, the speed table per CPU capability.

Nothing here runs a benchmark; the contenders themselves are run by ``benchmarks/speed.py --quick``
and ``benchmarks/gpu_check.py --smoke``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lora_exp.model.precision import Device

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import speed  # noqa: E402
import speed_gpu  # noqa: E402
import speed_report  # noqa: E402

CPU_AVX512 = Device("cpu", "Xeon", False, "AVX512")
CPU_AVX512_BF16 = Device("cpu", "Xeon (Sapphire Rapids)", True, "AVX512")
CPU_AVX2 = Device("cpu", "EPYC", False, "AVX2")


def test_llama_3_1_8b_parameter_count_matches_the_published_model():
    arch = gpu_check.architecture(smoke=False)
    total, non_embedding = gpu_check.llama_params(arch)
    assert total == 8_030_261_248  # meta-llama/Llama-3.1-8B, 128,256 x 4,096 untied embeddings and head
    assert non_embedding == total - 128_256 * 4_096


def test_mfu_of_an_8b_lora_step_by_hand():
    arch = gpu_check.architecture(smoke=False)
    _, n = gpu_check.llama_params(arch)
    lora, six_n = speed_gpu.flops_per_token(arch, 2048, n)
    attention = 2 * 2 * 32 * 2048 * 4096  # QK^T and AV, causal half, forward, per token
    assert lora == 4 * n + 3 * attention  # no weight gradients for the frozen base
    assert six_n == 6 * n + 3 * attention
    # 10,000 tokens/s of 8B LoRA training at sequence 2048 on a 989 TFLOP/s GPU: ~33.6% MFU
    assert gpu_check.mfu(10_000, lora, 989.4) == pytest.approx(10_000 * (4 * n + 3 * attention) / 989.4e12)
    assert gpu_check.mfu(10_000, lora, 989.4) == pytest.approx(0.336, abs=0.001)


def test_effective_sequence_weights_attention_by_tokens():
    assert gpu_check.effective_seq([2048, 2048]) == 2048
    assert gpu_check.effective_seq([1024, 2048]) == pytest.approx((1024**2 + 2048**2) / 3072)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H20", 148.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla T4", 65.0),
        ("Some Future GPU", None),
    ],
)
def test_gpu_peak_lookup(name, peak):
    assert speed_gpu.peak_tflops(name) == peak


def test_gpu_check_without_cuda_fails_with_one_clear_message():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU is visible" in proc.stderr and "nothing was run" in proc.stderr


@pytest.mark.parametrize(
    ("device", "label", "anchor"),
    [
        (CPU_AVX512, "AVX512 without bf16", "hf_fp32"),
        (CPU_AVX512_BF16, "AVX512-BF16", "hf_bf16"),
        (CPU_AVX2, "AVX2 without bf16", "hf_fp32"),
    ],
)
def test_speed_anchor_is_hf_at_the_best_precision_of_the_machine(device, label, anchor):
    assert speed_report.capability_label(device) == label
    assert speed_report.anchor_name(device) == anchor


def test_speed_default_row_has_no_overrides_and_bf16_is_slow_only_without_native_bf16():
    rows = speed.lora_exp_rows(CPU_AVX512)
    assert rows["lora_exp"] == []
    assert rows["lora_exp -padding-free"] == ["data.padding_free=false"]
    assert speed.slow_here("lora_exp bf16", CPU_AVX512) and speed.slow_here("hf_bf16", CPU_AVX512)
    assert not speed.slow_here("hf_bf16", CPU_AVX512_BF16)
    assert "lora_exp fp32" in speed.lora_exp_rows(CPU_AVX512_BF16)
    overrides = " ".join(speed.lora_exp_overrides(_spec()))
    for key in ("precision", "dtype", "packing", "padding_free", "speed.", "loss.impl", "attn_implementation"):
        assert key not in overrides


def _spec() -> dict:
    return {
        "train_path": "t.jsonl",
        "eval_path": "e.jsonl",
        "max_seq_len": 416,
        "batch_size": 8,
        "seed": 0,
        "lora_r": 16,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lr": 1e-3,
        "warmup_ratio": 0.1,
    }


def _results() -> dict:
    rows = {
        "hf_fp32": (100.0, 6.30),
        "plain": (110.0, 6.31),
        "lora_exp": (300.0, 6.35),
        "lora_exp fastest": (320.0, 6.50),
        "lora_exp -padding-free": (150.0, 6.31),
    }
    out = {}
    for name, (tps, loss) in rows.items():
        out[name] = {"tokens": 1000, "tokens_per_s": tps, "wall_s": 10.0, "peak_rss_mb": 1000.0, "steps": 4}
        out[name].update(eval_loss=loss, base_eval_loss=7.0, train_loss=loss)
    out["hf_bf16"] = out["lora_exp bf16"] = {"skipped": speed.SLOW_BF16}
    return out


def test_speed_table_and_targets_against_the_fp32_anchor():
    results = _results()
    text = speed_report.table("variable", results, "hf_fp32")
    assert "vs anchor (HF fp32)" in text
    assert "| hf_bf16 | skipped: slow here" in text
    assert "| lora_exp | 300 | 3.00x |" in text
    lines = speed_report.verdict(results, "hf_fp32")
    default = next(line for line in lines if line.startswith("- `lora_exp`:"))
    assert "3.00x" in default and "(target >= 2.5x): met" in default
    assert "0.79% apart, tolerance 2%): met" in default  # 6.35 vs 6.30
    fastest = next(line for line in lines if line.startswith("- `lora_exp fastest`:"))
    assert "3.17% apart, tolerance 2%): MISSED" in fastest  # 6.50 vs 6.30
    assert any("vs `lora_exp bf16`: skipped: slow here" in line for line in lines)
    assert any("`lora_exp fastest`): 1.07x the default" in line for line in lines)
    assert any("lever padding-free: turning it off costs 2.00x" in line for line in lines)


def test_write_readme_keeps_a_section_per_capability(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nintro\n")
    speed_report.write_readme("## AVX512-BF16 table v1", "AVX512-BF16", readme)
    speed_report.write_readme("## no-bf16 table v1", "AVX512 without bf16", readme)
    speed_report.write_readme("## no-bf16 table v2", "AVX512 without bf16", readme)
    text = readme.read_text()
    assert "intro" in text and "AVX512-BF16 table v1" in text and "no-bf16 table v2" in text
    assert "no-bf16 table v1" not in text
    assert text.count("<!-- speed:begin ") == 2


def test_shipped_readme_has_a_section_per_measured_capability():
    text = (BENCH / "README.md").read_text()
    for label in ("AVX512-BF16", "AVX512 without bf16"):
        assert speed_report.README_BEGIN.format(label) in text
        assert speed_report.README_END.format(label) in text


def test_gpu_check_parity_passes_and_catches_examples_attending_to_each_other(tmp_path, monkeypatch):
    """The parity stage on a tiny Llama (CPU, fp32): padded == padding-free; and when the flattened
    row's positions do not restart (examples see each other), the LoRA gradients give it away
    although the loss of random weights barely moves."""
    import torch

    from lora_exp.data import packing

    args = gpu_check.parse_args(["--smoke", "--seq", "64"])
    folder = gpu_check.build_random_folder(gpu_check.architecture(smoke=True), tmp_path / "model", "cpu")
    train, val, _ = gpu_check.write_data(folder, tmp_path / "data", 4, args.seq, args.batch)
    overrides = [*gpu_check.train_overrides(folder, train, val, args), "trainer.accelerator=cpu"]
    ok = gpu_check.parity(overrides, args.batch)
    assert ok["ok"] and ok["supervised_tokens"][0] == ok["supervised_tokens"][1]
    assert ok["shapes"]["padded"][0] == 2 and ok["shapes"]["padding_free"][0] == 1

    flatten = packing.PackCollator.__call__

    def leaky(self, rows):
        out = flatten(self, rows)
        out["position_ids"] = torch.arange(out["input_ids"].shape[1]).unsqueeze(0)
        return out

    monkeypatch.setattr(packing.PackCollator, "__call__", leaky)
    bad = gpu_check.parity(overrides, args.batch)
    assert not bad["ok"] and bad["grad_rel_err"] > gpu_check.PARITY_GRAD_RTOL
