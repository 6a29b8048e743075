"""GPU check: the Llama-3.1-8B architecture with random weights, trained through ``python -m lora_exp.train``.

    bash benchmarks/gpu_check.sh                        # one H100/H200-class GPU, ~6-8 min
    bash benchmarks/gpu_check.sh --batch 2 --steps 20   # smaller, e.g. on an 80 GB card under pressure
    python benchmarks/gpu_check.py --smoke              # the same stages on CPU with a tiny Llama

No hub access is needed: the architecture is the one ``conf/model/llama3_1_8b.yaml`` ships (what
``plan`` builds offline); the weights are random, built once on the GPU in bf16 and saved as an HF
folder with the project's embedded tokenizer, then passed to the public command as ``model.path``
(speed and parity do not depend on the weights' values). Stages, each reported even if another fails:

1. parity: one batch of examples of different lengths, padded and padding-free, through the
   project's own collators, model loading, LoRA wrap (B made non-zero, so the adapter matters),
   fast path and loss: loss and LoRA gradients must agree within bf16 tolerance (with random weights
   the loss barely moves when examples leak into each other, so the gradients are the real check:
   on a tiny Llama a leak moves them ~23%, bf16 rounding ~0.4%; tests/test_benchmarks.py);
2. ``lora_exp.train`` with its defaults (padding-free, precision/attention/loss ``auto``) for
   ``--steps`` steps at sequence ``--seq``: steady tokens/s (last 20 steps) and MFU;
3. the same with padded batches (``data.padding_free=false``): tokens/s beside it;
4. QLoRA (``quant=nf4``) for a few steps: tokens/s and a finite, falling loss.

MFU counts the FLOPs LoRA training needs (``speed_gpu.flops_per_token``: forward 2N, the backward
through the frozen weights 2N, attention at each example's own length) over the GPU's dense 16-bit
peak (``speed_gpu.PEAK_16BIT_TFLOPS``, or ``--peak-tflops``); the 6N convention is shown beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from speed_gpu import effective_seq, flops_per_token, llama_params, mfu, peak_tflops  # noqa: E402

PARITY_LOSS_RTOL = 1e-2  # bf16 keeps 8 significant bits: ~0.4% per rounding, a few roundings deep
# LoRA gradients pass through 32 layers of bf16 forward and backward, summed in different orders;
# an example attending to its neighbour in the flattened row moves them by tens of percent
PARITY_GRAD_RTOL = 1e-1
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


class CheckFailed(RuntimeError):
    """One stage's check did not hold."""


# ---- checks ------------------------------------------------------------------------------------------------
def relative_error(a, b) -> float:
    """||a - b|| / ||b|| of two tensors (float64)."""
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- inputs --------------------------------------------------------------------------------------------
def architecture(smoke: bool) -> dict:
    from omegaconf import OmegaConf

    arch = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "model" / "llama3_1_8b.yaml").config, resolve=True)
    return {**arch, **TINY, "vocab_size": 49152} if smoke else arch


def build_random_folder(arch: dict, folder: Path, device: str) -> Path:
    """Random weights of ``arch`` as an HF folder (bf16 on CUDA, built on the GPU in seconds)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lora_exp.model.load import ensure_smollm2_folder

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**arch))
    finally:
        torch.set_default_dtype(default)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(ensure_smollm2_folder()).save_pretrained(tmp)
    tmp.replace(folder)
    del model
    return folder


def write_data(folder: Path, out: Path, n: int, seq: int, batch: int) -> tuple[Path, Path, list[int]]:
    """Chat examples of 50-100% of ``seq`` tokens, one of exactly ``seq`` in every batch (so padded
    batches are ``seq`` wide); their rendered lengths are exact (``speed_data``)."""
    import speed_data

    from lora_exp.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    words = speed_data.single_token_words(tokenizer)
    rng = random.Random(0)
    lengths = [seq if k % batch == 0 else rng.randint(seq // 2, seq) for k in range(n)]
    examples = [speed_data.make_example(tokenizer, rng, words, total, 0.5) for total in lengths]
    train = speed_data.write_jsonl(out / "train.jsonl", examples)
    val = speed_data.write_jsonl(out / "val.jsonl", examples[:batch])
    return train, val, lengths


# ---- stage 1: padded vs padding-free parity, in process ----------------------------------------------------
def compose(overrides: list[str]):
    """The run config exactly as ``python -m lora_exp.train OVERRIDES`` composes it, ``auto`` resolved."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lora_exp.config import config_dir
    from lora_exp.model import precision

    with initialize_config_dir(config_dir=config_dir(), version_base=None):
        cfg = hydra_compose("train", overrides=overrides)
    choices = precision.resolve(cfg)
    return cfg, choices


def parity(overrides: list[str], batch: int) -> dict:
    """Loss and LoRA gradients of one batch, padded and padding-free, with the project's own pieces."""
    import lightning as L
    import torch

    from lora_exp.data.datamodule import InstructionDataModule
    from lora_exp.data.packing import PackCollator, PadCollator
    from lora_exp.model import lora
    from lora_exp.model.load import load_base_model, load_tokenizer, resolve_model_folder
    from lora_exp.training import fastpath
    from lora_exp.training.loss import causal_lm_loss

    cfg, choices = compose(overrides)
    print(f"[gpu_check] parity: {choices.line()}", flush=True)
    folder = resolve_model_folder(cfg.model)
    dm = InstructionDataModule(cfg.data, load_tokenizer(folder), cfg.seed)
    dm.setup("fit")
    rows = dm.train_rows[:batch]
    device = "cuda" if choices.device.kind == "cuda" else "cpu"
    model = load_base_model(cfg.model, folder, cfg.get("quant"))
    L.seed_everything(cfg.seed, verbose=False)
    model = lora.wrap(model, cfg.lora).to(device)
    fastpath.install(model, cfg.get("speed"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would make the adapter, and its A gradients, vanish
            torch.nn.init.normal_(p, std=0.02)
    model.eval()  # no dropout: both layouts must see the same function
    flash = choices.attn_implementation == "flash_attention_2"
    layouts = {"padded": PadCollator(dm.pad_id)(rows), "padding_free": PackCollator(flash_attn_kwargs=flash)(rows)}
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(choices.trainer_precision)
    out = {}
    for name, b in layouts.items():
        b = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        model.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
            res = causal_lm_loss(model, b, chunk_size=int(cfg.loss.chunk_size))
            loss = res.loss_sum / res.n_tokens
        loss.backward()
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        out[name] = {
            "loss": float(loss.detach()),
            "tokens": int(res.n_tokens),
            "grads": grads.cpu(),
            "shape": list(b["input_ids"].shape),
        }
    pad, free = out["padded"], out["padding_free"]
    result = {
        "shapes": {"padded": pad["shape"], "padding_free": free["shape"]},
        "supervised_tokens": [pad["tokens"], free["tokens"]],
        "loss_padded": pad["loss"],
        "loss_padding_free": free["loss"],
        "loss_rel_diff": abs(pad["loss"] - free["loss"]) / abs(pad["loss"]),
        "grad_rel_err": relative_error(free["grads"], pad["grads"]),
        "precision": choices.trainer_precision,
        "attention": choices.attn_implementation,
    }
    if device == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    ok = (
        pad["tokens"] == free["tokens"]
        and result["loss_rel_diff"] <= PARITY_LOSS_RTOL
        and result["grad_rel_err"] <= PARITY_GRAD_RTOL
    )
    result["ok"] = ok
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


# ---- stages 2-4: the public command -------------------------------------------------------------------------
def train_overrides(folder: Path, train: Path, val: Path, args) -> list[str]:
    """The benchmark's model and data through ``python -m lora_exp.train``; batching, precision,
    attention and loss stay at their defaults unless a stage says otherwise."""
    return [
        "model=llama3_1_8b",
        f"model.path={folder}",
        "data=jsonl",
        f"data.train_path={train}",
        f"data.val_path={val}",
        f"data.max_seq_len={args.seq}",
        f"data.batch_size={args.batch}",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "logger=none",
        "callbacks=none",
        "+callbacks.peak_memory._target_=lora_exp.planning.memprobe.PeakMemory",
    ]


def train_run(name: str, overrides: list[str], work: Path, timeout: float) -> dict:
    """One ``python -m lora_exp.train`` run; its metrics, per-step losses and steady tokens/s."""
    run_dir = work / "runs" / name
    cmd = [sys.executable, "-m", "lora_exp.train", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    print(f"[gpu_check] {name}: python -m lora_exp.train {' '.join(overrides[-3:])} ...", flush=True)
    start = time.perf_counter()
    log = work / f"{name}.log"
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise CheckFailed(f"{name}: exited {proc.returncode}; last lines of {log}:\n{_tail(log)}")
    m = json.loads((run_dir / "metrics.json").read_text())
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]
    losses = [float(h["train/loss"]) for h in history if "train/loss" in h]
    rates = [float(h["train/tokens_per_s"]) for h in history if "train/tokens_per_s" in h]
    memory = run_dir / "memory.json"
    peak = json.loads(memory.read_text())["cuda_peak_bytes"] / 2**30 if memory.is_file() else 0.0
    peak = peak or None  # 0 on CPU (--smoke): no GPU figure
    return {
        "wall_s": time.perf_counter() - start,
        "steps": m.get("trainer/global_step"),
        "tokens": m.get("train/tokens"),
        "tokens_per_s_all": m.get("train/tokens_per_s"),
        # the logged rate is a 20-step window: its last value leaves the first (warm-up) steps out
        "tokens_per_s": rates[-1] if rates else m.get("train/tokens_per_s"),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "peak_gpu_gb": peak,
        "precision": m.get("precision/trainer"),
        "attention": m.get("precision/attn_implementation"),
        "loss_impl": m.get("precision/loss_impl"),
    }


def _tail(path: Path, n: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def run_stage(name: str, stage, args) -> dict:
    """One stage's result, or ``{"error": why}``: a failing stage never stops the others."""
    try:
        r = stage()
        if name != "parity":
            check_run(name, r, args.qlora_steps if name == "qlora" else args.steps)
        return r
    except subprocess.TimeoutExpired as e:
        return {"error": f"stopped after {e.timeout:.0f} s: the --budget-s {args.budget_s:.0f} s was spent"}
    except (CheckFailed, RuntimeError, OSError) as e:  # CUDA out-of-memory is a RuntimeError
        return {"error": str(e)}


def check_run(name: str, r: dict, min_steps: int) -> None:
    import math

    if not r["steps"] or r["steps"] < min_steps:
        raise CheckFailed(f"{name}: trained {r['steps']} steps, expected {min_steps}")
    if r["last_loss"] is None or not math.isfinite(r["last_loss"]):
        raise CheckFailed(f"{name}: final loss {r['last_loss']}")


# ---- driver ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="training steps of the bf16 runs (tokens/s: the last 20)")
    p.add_argument("--qlora-steps", type=int, default=6, help="training steps of the QLoRA nf4 run")
    p.add_argument("--batch", type=int, default=4, help="examples per step (data.batch_size)")
    p.add_argument("--seq", type=int, default=2048, help="longest example; the others are 50-100%% of it")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16/fp16 peak (TFLOP/s)")
    p.add_argument("--work", type=Path, default=None, help="work folder (default outputs/gpu_check/<time>)")
    p.add_argument("--model-dir", type=Path, default=None, help="where the random weights go (default: in --work)")
    p.add_argument("--skip", nargs="*", default=[], choices=["parity", "default", "padded", "qlora"])
    p.add_argument("--budget-s", type=float, default=540, help="stop starting stages after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny Llama on CPU, seq 128: checks this script, not a GPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.seq, args.steps, args.qlora_steps, args.batch = min(args.seq, 128), min(args.steps, 3), 2, 2
        args.budget_s = max(args.budget_s, 3600)  # a loaded CPU: the budget is for the GPU's device time
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False), so nothing was run. "
            "This check needs one H100/H200-class GPU; `python benchmarks/gpu_check.py --smoke` runs its "
            "stages on CPU with a tiny model.",
            file=sys.stderr,
        )
        return 2
    device = "cpu" if args.smoke else "cuda"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    work = (args.work or ROOT / "outputs" / "gpu_check" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    arch = architecture(args.smoke)
    start = time.perf_counter()
    folder = build_random_folder(arch, (args.model_dir or work / "model").resolve(), device)
    print(
        f"[gpu_check] {gpu}: random Llama-3.1-8B-architecture weights at {folder} "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    n = args.batch * (args.steps + 2)
    train, val, lengths = write_data(folder, work / "data", n, args.seq, args.batch)
    base = train_overrides(folder, train, val, args)
    results: dict = {"gpu": gpu, "torch": torch.__version__, "seq": args.seq, "batch": args.batch, "stages": {}}
    deadline = start + args.budget_s
    steps = f"trainer.max_steps={args.steps}"
    stages = {  # most telling first: a run cut short by the budget loses the least
        "parity": lambda: parity(base, args.batch),
        "default": lambda: train_run("default", [*base, steps], work, deadline - time.perf_counter()),
        "qlora": lambda: train_run(
            "qlora", [*base, f"trainer.max_steps={args.qlora_steps}", "quant=nf4"], work, deadline - time.perf_counter()
        ),
        "padded": lambda: train_run(
            "padded", [*base, steps, "data.padding_free=false"], work, deadline - time.perf_counter()
        ),
    }
    failed = []
    for name, stage in stages.items():
        if name in args.skip:
            continue
        if deadline - time.perf_counter() < 45:
            results["stages"][name] = {"error": f"not run: the --budget-s {args.budget_s:.0f} s was spent"}
        else:
            results["stages"][name] = run_stage(name, stage, args)
        r = results["stages"][name]
        if "error" in r or not r.get("ok", True):
            failed.append(name)
            print(f"[gpu_check] {name}: FAILED: {r.get('error', 'outside tolerance')}", flush=True)
    _, non_embedding = llama_params(arch)
    text = summary(results, arch, non_embedding, lengths, args.peak_tflops or peak_tflops(gpu), args)
    print("\n" + text)
    (work / "summary.md").write_text(text + "\n")
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\n[gpu_check] {time.perf_counter() - start:.0f} s; results in {work}")
    if failed:
        print(f"[gpu_check] FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def summary(results: dict, arch: dict, non_embedding: int, lengths: list[int], peak: float | None, args) -> str:
    """The markdown report: one row per training run, then the parity and QLoRA verdicts."""
    seq_eff = effective_seq(lengths)
    lora_f, six_f = flops_per_token(arch, seq_eff, non_embedding)
    lines = [
        f"## GPU check: Llama-3.1-8B architecture (random weights), LoRA r=16 q,k,v,o, batch {args.batch}, "
        f"examples {min(lengths)}-{max(lengths)} tokens",
        "",
        f"GPU: {results['gpu']}; torch {results['torch']}; peak {peak or '?'} TFLOP/s dense 16-bit; "
        f"attention at effective length {seq_eff:.0f}. `bash benchmarks/gpu_check.sh`",
        "",
        "| run | precision | attention | loss | steps | tokens/s (last 20 steps) | MFU (LoRA FLOPs) | MFU (6N) "
        "| peak GPU GB | loss first -> last |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in ("default", "padded", "qlora"):
        r = results["stages"].get(name)
        if not r:
            continue
        if "error" in r:
            lines.append(f"| {name} | FAILED: {r['error'].splitlines()[0]} | | | | | | | | |")
            continue
        tps = r["tokens_per_s"] or 0.0
        m1 = f"{100 * mfu(tps, lora_f, peak):.1f}%" if peak else "?"
        m6 = f"{100 * mfu(tps, six_f, peak):.1f}%" if peak else "?"
        mem = f"{r['peak_gpu_gb']:.1f}" if r["peak_gpu_gb"] is not None else "?"
        lines.append(
            f"| {name} | {r['precision']} | {r['attention']} | {r['loss_impl']} | {r['steps']} | {tps:,.0f} | {m1} "
            f"| {m6} | {mem} | {r['first_loss']:.4f} -> {r['last_loss']:.4f} |"
        )
    p = results["stages"].get("parity")
    if p and "error" not in p:
        lines += [
            "",
            f"Parity (one batch, padded {p['shapes']['padded']} vs padding-free {p['shapes']['padding_free']}, "
            f"{p['precision']}, {p['attention']}): loss {p['loss_padded']:.5f} vs {p['loss_padding_free']:.5f} "
            f"({100 * p['loss_rel_diff']:.3f}% apart, tolerance {100 * PARITY_LOSS_RTOL:.0f}%), LoRA gradients "
            f"{100 * p['grad_rel_err']:.2f}% apart (tolerance {100 * PARITY_GRAD_RTOL:.0f}%): "
            f"{'ok' if p['ok'] else 'FAILED'}.",
        ]
    elif p:
        lines += ["", f"Parity: FAILED: {p['error']}"]
    if not peak:
        lines += ["", f"Unknown peak for {results['gpu']}: pass --peak-tflops for MFU."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
