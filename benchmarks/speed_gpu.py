"""GPU mode of the speed benchmark: Llama-3.1-8B architecture, bf16 LoRA, sequences of 2048 tokens.

Runs lora-exp's own training path (``LoraModule``, its loss, Lightning with ``bf16-mixed`` over a
bf16 frozen base, the ``Throughput`` callback) for a few steps and reports real tokens/s and MFU.
The weights are random (the hub is usually unreachable from benchmark machines; speed does not
depend on the values). MFU counts the FLOPs LoRA training really needs: forward 2N, the backward
through the frozen weights 2N (no weight gradients), attention 4 x layers x seq x d_model per token
each way; the common ``6N`` convention, which also counts the frozen weights' gradients, is shown
beside it.
"""

from __future__ import annotations

import time
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"

# Llama-3.1-8B (meta-llama/Llama-3.1-8B config.json)
LLAMA_3_1_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# Dense (no sparsity) 16-bit tensor-core peaks in TFLOP/s, from NVIDIA's datasheets: bf16 where the GPU
# has it, fp16 on V100 / T4 (the precision ``auto`` picks there). Longer names first ("H100 PCIe").
PEAK_16BIT_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "GH200": 989.4,
    "H100": 989.4,
    "H200": 989.4,
    "H800": 989.4,
    "H20": 148.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 4090": 165.2,
    "V100": 125.0,
    "T4": 65.0,
}


def peak_tflops(name: str) -> float | None:
    """The dense 16-bit peak of a GPU from its ``torch.cuda.get_device_name()``, or None if unknown."""
    for key, value in PEAK_16BIT_TFLOPS.items():
        if key in name:
            return value
    return None


def llama_params(arch: dict) -> tuple[int, int]:
    """(all parameters, parameters without the input embedding) of a Llama with this config."""
    h, i, layers = arch["hidden_size"], arch["intermediate_size"], arch["num_hidden_layers"]
    head_dim = arch.get("head_dim") or h // arch["num_attention_heads"]
    kv = arch["num_key_value_heads"] * head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q,o + k,v + mlp + two norms
    embed = arch["vocab_size"] * h
    head = 0 if arch.get("tie_word_embeddings") else embed
    non_embedding = layers * per_layer + h + head  # final norm + LM head
    return embed + non_embedding, non_embedding


def effective_seq(lengths: list[int]) -> float:
    """The sequence length whose per-token attention cost equals the mean over these examples.

    Causal attention over an example of length L costs ~L^2, i.e. ~L per token, so the token-weighted
    mean is sum(L^2) / sum(L).
    """
    return sum(n * n for n in lengths) / sum(lengths)


def mfu(tokens_per_s: float, flops_per_tok: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (``peak`` in TFLOP/s)."""
    return tokens_per_s * flops_per_tok / (peak * 1e12)


def flops_per_token(cfg: dict, seq: int, n_params: int) -> tuple[float, float]:
    """(LoRA training FLOPs per token, 6N-convention FLOPs per token), attention included in both."""
    attn = 2 * 2 * cfg["num_hidden_layers"] * seq * cfg["hidden_size"]  # QK^T and AV, causal half, fwd
    lora = 2 * n_params + 2 * n_params + 3 * attn  # fwd, input-grad bwd; attention fwd + 2x bwd
    six_n = 6 * n_params + 3 * attn
    return lora, six_n


def main(args) -> int:
    import torch

    if not torch.cuda.is_available():
        print(
            "[speed] --gpu: no CUDA GPU on this machine, so the GPU mode (Llama-3.1-8B, bf16 LoRA, seq 2048, "
            "MFU) was not run; the CPU table in benchmarks/README.md stands."
        )
        return 0
    import lightning as L
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_exp.model import lora
    from lora_exp.training import fastpath
    from lora_exp.training.callbacks import Throughput
    from lora_exp.training.module import LoraModule

    seq, batch, steps = 2048, args.gpu_batch, args.gpu_steps
    name = torch.cuda.get_device_name()
    config = LlamaConfig(**LLAMA_3_1_8B, attn_implementation="sdpa", use_cache=False)
    start = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        base = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    n_params = sum(p.numel() for p in base.parameters()) - base.get_input_embeddings().weight.numel()
    torch.manual_seed(0)
    lora_cfg = OmegaConf.create(
        {"r": 16, "alpha": 16, "dropout": 0.05, "target_modules": "qkvo", "bias": "none", "init": "default"}
    )
    model = lora.wrap(base, lora_cfg)
    speed_cfg = OmegaConf.load(CONF / "train.yaml").speed  # the fast path a default run takes
    fastpath.install(model, speed_cfg)
    if args.gpu_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    print(f"[speed] GPU {name}: Llama-3.1-8B arch built in {time.perf_counter() - start:.0f} s", flush=True)

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(batch * (steps + 3)):
        ids = torch.randint(0, config.vocab_size, (seq,), generator=g)
        labels = ids.clone()
        labels[: seq // 4] = -100  # a prompt: the loss sees the rest
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(seq, dtype=torch.long)})
    loader = DataLoader(rows, batch_size=batch)
    optim_cfg = OmegaConf.create(
        {
            "lr": 1e-4,
            "weight_decay": 0.0,
            "warmup_ratio": 0.0,
            "warmup_steps": 1,
            "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "fused": True},
            "scheduler": {"_target_": "transformers.get_constant_schedule_with_warmup", "_partial_": True},
        }
    )
    module = LoraModule(model, optim_cfg, lean_casts=bool(speed_cfg.no_input_cast))
    warm, timed = Throughput(), Throughput()
    trainer_kw = dict(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
    )
    L.Trainer(max_steps=3, callbacks=[warm], **trainer_kw).fit(module, loader)
    torch.cuda.reset_peak_memory_stats()
    L.Trainer(max_steps=steps, callbacks=[timed], **trainer_kw).fit(module, loader)
    tokens_per_s = timed.tokens / timed.seconds
    lora_f, six_f = flops_per_token(LLAMA_3_1_8B, seq, n_params)
    peak = args.peak_tflops or peak_tflops(name)
    lines = [
        f"## Speed on GPU: Llama-3.1-8B architecture, bf16 LoRA r=16 q,k,v,o, seq {seq}, batch {batch}",
        "",
        f"GPU: {name}; torch {torch.__version__}. `python benchmarks/speed.py --gpu`",
        "",
        "| tokens/s | MFU (LoRA FLOPs) | MFU (6N convention) | peak memory GB |",
        "|---:|---:|---:|---:|",
    ]
    mem = torch.cuda.max_memory_allocated() / 2**30
    if peak:
        mfu, mfu6 = tokens_per_s * lora_f / (peak * 1e12), tokens_per_s * six_f / (peak * 1e12)
        lines.append(f"| {tokens_per_s:,.0f} | {100 * mfu:.1f}% | {100 * mfu6:.1f}% | {mem:.1f} |")
        lines += ["", f"Target MFU >= 40% (LoRA FLOPs): {'met' if mfu >= 0.40 else 'MISSED'}."]
    else:
        lines.append(f"| {tokens_per_s:,.0f} | ? | ? | {mem:.1f} |")
        lines += ["", f"Unknown peak for {name}: pass --peak-tflops."]
    print("\n".join(lines))
    return 0
