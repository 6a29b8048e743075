"""Peak memory of the LM loss at Llama-3.1's vocabulary (128,256) on CPU: full logits vs chunked.

    python benchmarks/loss_memory.py                      # 2 x 1024 tokens, hidden 2048
    python benchmarks/loss_memory.py --batch 4 --seq 2048 --hidden 4096

One forward + backward of a one-layer Llama (bf16 frozen base, LoRA on q,k,v,o, bf16 autocast as
in training) per variant, each in a fresh process with ``MALLOC_MMAP_THRESHOLD_=65536``. Measured:
the process's peak resident memory during that step above its resident memory just before it
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs``), after one warm-up step. Variants:

- ``full``: transformers' own loss (``loss.impl=full``): logits for every position, upcast to fp32.
- ``chunked/N``: ``lora_exp.training.loss.causal_lm_loss`` (the default): the LM head only at supervised
  positions, N positions per chunk, fp32 logits recomputed in the backward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

VOCAB = 128_256  # Llama-3.1


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def measure(variant: str, batch: int, seq: int, hidden: int, supervised: float) -> dict:
    """One variant in this process: the peak extra resident memory (MiB) of one training step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_exp.training.loss import causal_lm_loss, full_logits_loss

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=1,
        num_attention_heads=max(hidden // 128, 1),
        num_key_value_heads=max(hidden // 512, 1),
        tie_word_embeddings=False,
    )
    with torch.device("meta"):  # skip transformers' slow init: the loss's memory does not depend on values
        base = LlamaForCausalLM(config)
    base = base.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for param in base.parameters():
            param.normal_(0.0, 0.02)
    base.model.rotary_emb.__init__(config)  # buffers computed at init, lost on the meta device
    model = get_peft_model(
        base, LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    model.train()
    ids = torch.randint(0, VOCAB, (batch, seq))
    labels = ids.clone()
    labels[:, : int(seq * (1 - supervised))] = -100  # the prompt part is not supervised
    data = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    if variant == "full":
        loss_fn = full_logits_loss
        chunk = 0
    else:
        chunk = int(variant.split("/")[1])
        loss_fn = lambda m, b: causal_lm_loss(m, b, chunk)  # noqa: E731

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = loss_fn(model, data)
        loss = out.loss_sum / out.n_tokens
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up: allocator pools, lazy inits
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current size
    before = _status_kb("VmRSS")
    loss = step()
    peak = _status_kb("VmHWM")
    return {"variant": variant, "peak_extra_mib": round((peak - before) / 1024), "loss": round(loss, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--supervised", type=float, default=0.75, help="fraction of positions with labels")
    parser.add_argument("--chunks", default="1000000,4096,1024,256", help="chunk sizes of the chunked loss")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: measure one variant in this process
    args = parser.parse_args()
    shape = dict(batch=args.batch, seq=args.seq, hidden=args.hidden, supervised=args.supervised)
    if args.variant:
        print(json.dumps(measure(args.variant, **shape)))
        return

    tokens = args.batch * args.seq
    n_sup = args.batch * (args.seq - int(args.seq * (1 - args.supervised)))
    print(
        f"vocab {VOCAB:,}, {args.batch} x {args.seq} tokens ({n_sup:,} supervised), hidden {args.hidden}; "
        f"full fp32 logits of all positions would be {tokens * VOCAB * 4 / 2**20:,.0f} MiB"
    )
    print("| loss | peak extra memory (MiB) | loss value |\n|---|---:|---:|")
    variants = ["full"] + [f"chunked/{c}" for c in args.chunks.split(",")]
    for variant in variants:
        cmd = [sys.executable, __file__, "--variant", variant] + [f"--{k}={v}" for k, v in shape.items()]
        # a fixed mmap threshold makes glibc return every large freed block at once, so the resident
        # set follows live tensors (see the plan section above)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"| {variant} | failed: {proc.stderr.strip().splitlines()[-1]} | |")
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        label = "chunked, one chunk" if variant == "chunked/1000000" else variant
        print(f"| {label} | {row['peak_extra_mib']:,} | {row['loss']} |", flush=True)


if __name__ == "__main__":
    main()
