"""The speed benchmark's report: tables per case, the targets, the README section per CPU capability.

Used by ``speed.py``; pure functions of the results, so they are testable without running anything.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

README_BEGIN = "<!-- speed:begin {} (written by benchmarks/speed.py --write-readme) -->"
README_END = "<!-- speed:end {} -->"
LOSS_TOLERANCE = 0.02  # relative difference in held-out loss accepted as "the same result"
SPEED_TARGET = 2.5  # the default run's real-token throughput over the anchor's

NOTES = """
How to read it: `lora_exp` is `python -m lora_exp.train` with the benchmark's data, model and LoRA
only (precision, attention and loss `auto`, padding-free batches of `data.batch_size` examples).
`lora_exp fastest` adds token-budget packing (`data.packing=true`, `data.pack_tokens` = the padded
contenders' average batch, so the number of optimizer steps stays comparable). `lora_exp -X` rows
are the default run with one lever turned off; the lever's share of the speed-up is `lora_exp`'s
throughput over that row's. A precision row forces the other precision: on a CPU without native
bf16 the bf16 rows (HF and lora-exp) are skipped, since bf16 there runs ~50x slower than fp32. The
`speed.*` levers are in `src/lora_exp/training/fastpath.py`, each tested against the plain path:
`packed attention` runs one causal attention per example of a padding-free row instead of one over
the row under a block-diagonal mask; `bits dropout` draws LoRA dropout masks 15 bits at a time;
`no input cast` (bf16 autocast only) feeds LoRA layers their bf16 input instead of PEFT's fp32 copy.
`metrics.json` of every lora-exp run also records `time/first_step_s` (process start to the end of
the first training step) and `time/train_loop_s`. GPU: `bash benchmarks/gpu_check.sh` (Llama-3.1-8B
architecture with random weights, seq 2048: tokens/s, MFU, padded vs padding-free parity, QLoRA).
"""
DESCRIPTIONS = {
    "hf_fp32": "HF Trainer + PEFT, fp32 (its default precision), dynamic padding",
    "hf_bf16": "HF Trainer + PEFT, bf16=True, dynamic padding",
    "plain": "plain PyTorch loop, same padded batches, bf16 autocast where native bf16 else fp32",
    "lora_exp": "python -m lora_exp.train with no speed, precision or batching override (the defaults)",
    "lora_exp fastest": "lora-exp defaults + token-budget packing (data.packing=true)",
    "lora_exp -padding-free": "lora-exp, padded batches (data.padding_free=false)",
    "lora_exp -packed attention": "lora-exp, sdpa over the whole row under a block-diagonal mask",
    "lora_exp -bits dropout": "lora-exp, torch's dropout in the LoRA layers",
    "lora_exp -lean loss": "lora-exp, transformers' full-logits loss instead of the chunked one",
    "lora_exp -no input cast": "lora-exp, PEFT's fp32 copy of every LoRA layer's input",
    "lora_exp bf16": "lora-exp forced to bf16 (model.dtype=bfloat16 trainer.precision=bf16-mixed)",
    "lora_exp fp32": "lora-exp forced to fp32 (model.dtype=float32 trainer.precision=32-true)",
}


def capability_label(device) -> str:
    """A README section name for this CPU: "AVX512-BF16", "AVX512 without bf16", "AVX2 without bf16"."""
    if device.bf16:
        return f"{device.capability}-BF16" if device.capability.startswith("AVX512") else f"{device.capability}+bf16"
    return f"{device.capability} without bf16"


def anchor_name(device) -> str:
    """HF Trainer + PEFT at its best precision here: bf16=True only where bf16 is native."""
    return "hf_bf16" if device.bf16 else "hf_fp32"


def machine() -> str:
    """CPU model and core count (lscpu), or the GPU's name."""
    model, cores = platform.processor() or "unknown CPU", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = fields.get("Model name", model).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {cores} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB RAM"


def load_note(before: float) -> str:
    """The machine's load when the benchmark started (its own processes then keep the cores busy)."""
    cores = os.cpu_count() or 1
    if before > 0.5 * cores:
        return (
            f"measured under load (load average {before:.1f} on {cores} cores at the start): "
            "absolute numbers are pessimistic"
        )
    return f"otherwise idle (load average {before:.1f} on {cores} cores at the start)"


def _ratio(r: dict, base: dict | None, key: str) -> str:
    return f"{r[key] / base[key]:.2f}x" if base else "-"


def table(case: str, results: dict[str, dict], anchor: str) -> str:
    base = results.get(anchor)
    base = base if base and "skipped" not in base else None
    vs = f"vs anchor ({anchor.replace('_', ' ').replace('hf', 'HF')})"
    head = (
        f"| contender | real tokens/s | {vs} | wall s | peak RSS MB | {vs} | steps | held-out loss "
        "| loss vs anchor | train loss (last 25%) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [f"**{case}**", "", head]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"| {name} | {r['skipped']} | | | | | | | | |")
            continue
        dloss = f"{100 * (r['eval_loss'] - base['eval_loss']) / base['eval_loss']:+.1f}%" if base else "-"
        lines.append(
            f"| {name} | {r['tokens_per_s']:.0f} | {_ratio(r, base, 'tokens_per_s')} | {r['wall_s']:.0f} "
            f"| {r['peak_rss_mb']:.0f} | {_ratio(r, base, 'peak_rss_mb')} | {r['steps']} | {r['eval_loss']:.4f} "
            f"| {dloss} | {r['train_loss']:.4f} |"
        )
    ran = [r for r in results.values() if "skipped" not in r]
    if ran:
        lines += [
            "",
            f"{ran[0]['tokens']:,} real tokens; held-out loss of the untrained base {ran[0]['base_eval_loss']:.4f}.",
        ]
    return "\n".join(lines)


def verdict(results: dict[str, dict], anchor: str) -> list[str]:
    """The issue's targets, checked on the variable-length case."""
    ran = {n: r for n, r in results.items() if "skipped" not in r}
    if anchor not in ran or "lora_exp" not in ran:
        return []
    b = ran[anchor]
    label = anchor.replace("_", " ").replace("hf", "HF Trainer")
    mark = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    out = []
    for name in ("lora_exp", "lora_exp fastest"):
        if name not in ran:
            continue
        x = ran[name]
        speed = x["tokens_per_s"] / b["tokens_per_s"]
        mem = x["peak_rss_mb"] / b["peak_rss_mb"]
        dloss = abs(x["eval_loss"] - b["eval_loss"]) / b["eval_loss"]
        target = f" (target >= {SPEED_TARGET}x): {mark(speed >= SPEED_TARGET)}" if name == "lora_exp" else ""
        out += [
            f"- `{name}`: real-token throughput {speed:.2f}x {label}{target}; peak memory {mem:.2f}x; "
            f"held-out loss {x['eval_loss']:.4f} vs {b['eval_loss']:.4f} ({100 * dloss:.2f}% apart, "
            f"tolerance {100 * LOSS_TOLERANCE:.0f}%): {mark(dloss <= LOSS_TOLERANCE)}",
        ]
    full = ran["lora_exp"]["tokens_per_s"]
    auto = ran["lora_exp"].get("precision") or "?"
    forced = [n for n in ("lora_exp bf16", "lora_exp fp32") if n in results]
    for name in forced:  # the done-when: auto within 10% of the fastest explicit precision
        if name in ran:
            ratio = full / ran[name]["tokens_per_s"]
            out.append(
                f"- precision `auto` ({auto}) runs at {ratio:.2f}x `{name}` (target >= 0.9x): {mark(ratio >= 0.9)}"
            )
        else:
            out.append(f"- precision `auto` ({auto}) vs `{name}`: {results[name]['skipped']}")
    if "lora_exp fastest" in ran:
        out.append(
            f"- token-budget packing (`lora_exp fastest`): "
            f"{ran['lora_exp fastest']['tokens_per_s'] / full:.2f}x the default"
        )
    for name, r in ran.items():
        if name.startswith("lora_exp ") and name != "lora_exp fastest":
            what = name.split(" ", 1)[1]
            what = f"lever {what[1:]}: turning it off" if what.startswith("-") else f"forcing {what}"
            out.append(f"- {what} costs {full / r['tokens_per_s']:.2f}x")
    return out


def write_readme(text: str, label: str, path: Path = HERE / "README.md") -> None:
    """Replace this capability's section of benchmarks/README.md (other sections are left alone)."""
    begin, end = README_BEGIN.format(label), README_END.format(label)
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in old and end in old:
        before, rest = old.split(begin, 1)
        new = before + block + rest.split(end, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def report(args, sections: list[str], variable: dict, seconds: float, device) -> str:
    import torch
    import transformers

    anchor = anchor_name(device)
    lines = [
        f"## Speed on {capability_label(device)}: lora-exp vs HF Trainer + PEFT",
        "",
        f"Machine: {machine()}; CPU capability {device.capability} "
        f"(`torch.backends.cpu.get_cpu_capability()`), native bf16: {'yes' if device.bf16 else 'no'}; "
        f"{load_note(args.load_before)}. torch {torch.__version__}, transformers {transformers.__version__}. "
        f"Anchor: `{anchor}` (HF Trainer + PEFT at its best precision here).",
        f"`{' '.join(['python benchmarks/speed.py', *args.argv])}` took {seconds / 60:.1f} min "
        f"({time.strftime('%Y-%m-%d')}). "
        "Model SmolLM2-135M, LoRA r=16 alpha=16 on q,k,v,o, AdamW lr 1e-3, cosine, one epoch. "
        "Real tokens/s = non-padding tokens / training-loop time; wall = whole process; "
        "peak RSS of each contender's own process; held-out loss: every adapter through the same fp32 evaluator.",
        "",
    ]
    for s in sections:
        lines += [s, ""]
    targets = verdict(variable, anchor)
    if targets:
        lines += [f"Targets (variable lengths, against `{anchor}`):", "", *targets, ""]
    shown = [k for k in DESCRIPTIONS if k in variable] or list(DESCRIPTIONS)
    lines.append("Contenders: " + "; ".join(f"`{k}` {DESCRIPTIONS[k]}" for k in shown) + ".")
    lines += ["", NOTES.strip()]
    return "\n".join(lines)
