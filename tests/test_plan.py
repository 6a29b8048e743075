"""``python -m lora_exp.plan``: PEFT's published counts, adapter size, memory estimate vs a measured run."""

from __future__ import annotations

import json

import pytest

from conftest import compose, run_cli, train_cli
from lora_exp.errors import ConfigError
from lora_exp.planning.memprobe import MEMORY_FILE
from lora_exp.planning.planner import GIB, make_plan

# Published PEFT figures for Llama-3.1-8B (TRAPS.md): (rank, targets) -> (trainable, all params)
LLAMA_8B = {
    (16, "qkvo"): (13_631_488, 8_043_892_736),
    (16, "all_linear"): (41_943_040, 8_072_204_288),
    (8, "qv"): (3_407_872, 8_033_669_120),
}


@pytest.mark.parametrize(("r", "targets"), list(LLAMA_8B), ids=[f"r{r}-{t}" for r, t in LLAMA_8B])
def test_llama_3_1_8b_counts_match_peft_published_figures(r, targets):
    plan = make_plan(compose("model=llama3_1_8b", f"lora.r={r}", f"lora.target_modules={targets}"))
    trainable, total = LLAMA_8B[(r, targets)]
    assert plan.params_line.startswith(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: ")
    # the adapter is the trainable weights in fp32, plus safetensors' small header
    assert 0 < plan.adapter_file_bytes - 4 * trainable < 200_000


def test_adapter_size_and_counts_match_a_real_run(tiny_run):
    plan = make_plan(compose("model=tiny_llama", "debug=quick"))
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert plan.trainable == metrics["trainable_params"]
    assert plan.total == metrics["total_params"]
    assert plan.adapter_file_bytes == (tiny_run / "adapter" / "adapter_model.safetensors").stat().st_size


def test_memory_terms_respond_to_quant_checkpointing_and_chunking():
    point = ["model=llama3_1_8b", "lora.r=8", "lora.target_modules=qv"]  # one meta model, shared (cached)
    base = make_plan(compose(*point))
    nf4 = make_plan(compose(*point, "quant=nf4"))
    ckpt = make_plan(compose(*point, "model.gradient_checkpointing=true"))
    chunked = make_plan(compose(*point, "loss.chunk_size=256"))
    bf16_weights = base.memory["base weights (bfloat16)"]
    assert bf16_weights == pytest.approx(2 * 8_030_261_248, rel=1e-6)  # every frozen weight in bf16
    # NF4 decoder linears (~0.52 B/param: 3.6 GB) but embeddings and lm_head in fp32 after PEFT's
    # k-bit preparation (4.2 GB): QLoRA halves this model's weights, not quarters them
    nf4_weights = sum(v for k, v in nf4.memory.items() if "weights" in k and "adapter" not in k)
    assert 0.45 < nf4_weights / bf16_weights < 0.5
    act = [k for k in base.memory if k.startswith("activations")][0]
    ckpt_act = [k for k in ckpt.memory if k.startswith("activations")][0]
    assert ckpt.memory[ckpt_act] < base.memory[act] / 5 and ckpt.activations_other == base.memory[act]

    def logits(plan):
        return sum(v for k, v in plan.memory.items() if k.startswith("logits"))

    # our loss holds one chunk of supervised positions at a time; 8 x 255 positions by default
    assert logits(chunked) / logits(base) == pytest.approx(256 / 2040)
    assert logits(base) < base.logits_full and chunked.peak_bytes < base.peak_bytes


def test_bad_plan_keys_are_named():
    with pytest.raises(ConfigError, match=r"plan.supervised_fraction=2.0"):
        make_plan(compose("model=tiny_llama", "plan.supervised_fraction=2"))
    with pytest.raises(ConfigError, match=r"plan.device='tpu'"):
        make_plan(compose("model=tiny_llama", "plan.device=tpu"))


def test_cli_sweep_table_flags_points_that_do_not_fit(tmp_path):
    proc = run_cli(
        "lora_exp.plan",
        "-m",
        "model=llama3_1_8b",
        "lora.r=8",
        "lora.target_modules=qv",
        "model.gradient_checkpointing=false,true",
        "plan.gpu_mem_gb=24",
        cwd=tmp_path,
    )
    out = proc.stdout
    assert out.count("trainable params: 3,407,872 || all params: 8,033,669,120") == 2
    assert "adapter on disk: 13.0" in out and "tokens per step: 2,048 = micro-batch 8 x 256 tokens" in out
    table = out[out.index("all points:") :].splitlines()
    rows = {line.split()[1]: line for line in table[3:5]}
    # bf16 Llama-3.1-8B at 8 x 256 tokens: ~29 GiB without checkpointing, ~19 GiB with it
    assert rows["model.gradient_checkpointing=False"].endswith("NO (> 24 GiB)")
    assert rows["model.gradient_checkpointing=True"].endswith("yes")
    assert list(tmp_path.iterdir()) == []  # a dry run leaves no output folders behind


def test_cli_bad_override_is_one_line_and_exit_2(tmp_path):
    proc = run_cli("lora_exp.plan", "model=tiny_llama", "plan.device=tpu", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "lora_exp.plan: error: invalid config" in proc.stderr and "plan.device='tpu'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_memory_estimate_of_the_default_model_matches_a_measured_cpu_run(tmp_path):
    """One training step of the default model on CPU: measured peak growth vs plan's estimate.

    glibc keeps freed heap memory and fragments it, which would make RSS measure the allocator
    rather than the tensors; a fixed mmap threshold returns every large block when it is freed,
    so the resident-set peak follows the live tensors, as PyTorch's allocator stats do on a GPU.
    In fp32 (``auto`` on a CPU without native bf16) the weights are views of the mapped
    safetensors file, resident only once read: the probe reads them before its baseline, or the
    step's growth would include the whole frozen base (measured 1.33 GB instead of 0.80 GB).
    """
    run_dir = tmp_path / "run"
    overrides = ["data.batch_size=4", "data.max_seq_len=256", "data.padding_free=false"]  # padded: the planned shape
    train_cli(
        run_dir,
        *overrides,
        "data.num_train=4",
        "data.num_val=4",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=0",
        "logger=none",
        "callbacks=none",
        "+callbacks.peak_memory._target_=lora_exp.planning.memprobe.PeakMemory",
        env={"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"},
    )
    measured = json.loads((run_dir / MEMORY_FILE).read_text())
    assert measured["peak_rss_exact"], "this kernel cannot reset the peak RSS (/proc/self/clear_refs)"
    width, supervised = measured["max_seq_len"], measured["max_supervised_tokens"]
    plan = make_plan(
        compose(
            *overrides,
            "plan.device=cpu",
            f"plan.seq_len={width}",
            f"plan.supervised_fraction={supervised / (4 * (width - 1))}",
        )
    )
    # the baseline is taken with the weights and the adapter resident: compare what a step adds
    weights = sum(v for k, v in plan.memory.items() if "weights" in k)
    assert measured["weights_bytes"] == pytest.approx(weights, rel=1e-4)  # + rotary buffers (bytes)
    step = sum(v for k, v in plan.memory.items() if "weights" not in k)
    assert step > 0.1 * GIB
    assert measured["rss_growth_bytes"] == pytest.approx(step, rel=0.25), (measured, plan.memory)
