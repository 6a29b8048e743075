"""Speed benchmark: lora-exp against HF Trainer + PEFT and a plain PyTorch loop, on the same work.

    python benchmarks/speed.py              # CPU: the table in benchmarks/README.md (~15 min, idle 2 cores)
    python benchmarks/speed.py --quick      # a small smoke run of every contender (~3 min)
    python benchmarks/speed.py --gpu        # Llama-3.1-8B architecture, bf16 LoRA, seq 2048: tokens/s and MFU

Every contender is its own process (peak RSS is per process, read from ``os.wait4``), trains the
same model (SmolLM2-135M by default) with the same LoRA (r=16, alpha=16, dropout 0.05, q,k,v,o),
the same optimizer and schedule, for one epoch over the same JSONL file written here. Afterwards
one evaluator computes every trained adapter's held-out loss with the same code, so "same final
loss" is checked on equal terms. Ratios are against HF Trainer + PEFT with ``bf16=True``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import speed_data  # noqa: E402

BASELINE = "hf_bf16"
README_BEGIN = "<!-- speed:begin (written by benchmarks/speed.py --write-readme) -->"
README_END = "<!-- speed:end -->"
LOSS_TOLERANCE = 0.05  # relative difference in held-out loss accepted as "the same result"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}

# lora-exp with every lever on, then with one lever off at a time (the lever's share of the speed-up)
LEVERS = {
    "lora_exp": [],
    "lora_exp -packing": ["data.packing=false"],
    "lora_exp -bf16 base": ["model.dtype=float32"],
    "lora_exp -lean loss": ["loss.impl=full"],
    "lora_exp -packed attention": ["speed.packed_attention=false"],
    "lora_exp -bits dropout": ["speed.lora_dropout=false"],
    "lora_exp -no input cast": ["speed.no_input_cast=false"],
}
NOTES = """
How to read it: `lora_exp -X` rows are lora-exp with one lever turned off; the lever's share of the
speed-up is lora-exp's throughput over that row's. Packed batches hold as many tokens as the padded
contenders' average batch (`data.pack_tokens`), so the number of optimizer steps stays comparable.
The `speed.*` levers are in `src/lora_exp/fastpath.py` and each is tested against the plain path
(`tests/test_fastpath.py`): `packed attention` runs one causal attention per packed example instead
of one over the whole row under a block-diagonal mask (on CPU, examples under 256 tokens take a
grouped-query matmul, ~2x faster forward + backward than torch's CPU flash kernel at those lengths);
`bits dropout` draws LoRA dropout masks 15 bits at a time instead of a float per element; `no input
cast` feeds LoRA layers their bf16 input instead of PEFT's fp32 copy (autocast runs them in bf16
either way). `metrics.json` of every lora-exp run also records `time/first_step_s` (process start to
the end of the first training step) and `time/train_loop_s`. GPU: `python benchmarks/speed.py --gpu`
(Llama-3.1-8B architecture with random weights, bf16 LoRA, seq 2048: tokens/s and MFU); on a machine
without a CUDA GPU it says so and exits.
"""
DESCRIPTIONS = {
    "hf_fp32": "HF Trainer + PEFT, default precision (fp32), dynamic padding",
    "hf_bf16": "HF Trainer + PEFT, bf16=True, dynamic padding",
    "plain": "plain PyTorch loop, same padded batches, bf16 autocast",
    "lora_exp": "python -m lora_exp.train: packing, bf16 base, chunked loss, the speed.* fast path",
    "lora_exp -packing": "lora-exp, padded batches instead of packing",
    "lora_exp -bf16 base": "lora-exp, fp32 frozen base (bf16 autocast still on)",
    "lora_exp -lean loss": "lora-exp, transformers' full-logits loss instead of the chunked one",
    "lora_exp -packed attention": "lora-exp, sdpa over the whole packed row under a block-diagonal mask",
    "lora_exp -bits dropout": "lora-exp, torch's dropout in the LoRA layers",
    "lora_exp -no input cast": "lora-exp, PEFT's fp32 copy of every LoRA layer's input",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few examples: checks that every contender runs")
    p.add_argument("--gpu", action="store_true", help="GPU mode: Llama-3.1-8B arch, bf16 LoRA, seq 2048, MFU")
    p.add_argument("--examples", type=int, default=None, help="variable-length training examples (default 256)")
    p.add_argument("--fixed-examples", type=int, default=None, help="fixed-length examples (default 64)")
    p.add_argument("--fixed-length", type=int, default=256, help="tokens of every fixed-length example")
    p.add_argument("--eval-examples", type=int, default=None, help="held-out examples (default 48)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step of the padded contenders")
    p.add_argument("--only", nargs="*", default=None, help="run only these contenders (names as in the table)")
    p.add_argument("--no-levers", action="store_true", help="skip the lora-exp runs with one lever off")
    p.add_argument("--no-fixed", action="store_true", help="skip the fixed-length case")
    p.add_argument("--out", type=Path, default=None, help="work folder (default: outputs/speed/<time>)")
    p.add_argument("--write-readme", action="store_true", help="put the table into benchmarks/README.md")
    p.add_argument("--reuse", action="store_true", help="keep contenders already finished in --out (same data)")
    p.add_argument("--model-path", default=None, help="an HF model folder instead of the default SmolLM2-135M")
    p.add_argument("--gpu-batch", type=int, default=2, help="GPU mode: sequences per step")
    p.add_argument("--gpu-steps", type=int, default=10, help="GPU mode: timed steps (after 3 warm-up steps)")
    p.add_argument("--gpu-checkpointing", action="store_true", help="GPU mode: activation checkpointing")
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU mode: the GPU's dense bf16 peak")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.out = args.out.resolve() if args.out else None  # workers run inside their own folder
    args.examples = args.examples or (24 if args.quick else 256)
    args.fixed_examples = args.fixed_examples or (16 if args.quick else 64)
    args.eval_examples = args.eval_examples or (8 if args.quick else 48)
    if args.quick:
        args.fixed_length = min(args.fixed_length, 128)
    return args


# ---- contenders ------------------------------------------------------------------------------------
def run_process(cmd: list[str], log_path: Path, cwd: Path) -> dict:
    """Run one contender; its wall time and peak RSS (this child only: ``os.wait4``)."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **OFFLINE_ENV})
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {code}; log {log_path}:\n{tail}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def run_worker(name: str, spec: dict, work: Path, reuse: bool = False) -> dict:
    folder = work / name.replace(" ", "_")
    if reuse and (folder / "result.json").is_file() and (folder / "process.json").is_file():
        done = json.loads((folder / "result.json").read_text())
        return {**done, **json.loads((folder / "process.json").read_text()), "adapter": str(folder / "adapter")}
    folder.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out_dir": str(folder)}
    (folder / "spec.json").write_text(json.dumps(spec, indent=2))
    worker = HERE / "speed_workers.py"
    cmd = [sys.executable, str(worker), name, str(folder / "spec.json"), str(folder / "result.json")]
    proc = run_process(cmd, folder / "log.txt", folder)
    (folder / "process.json").write_text(json.dumps(proc))
    return {**json.loads((folder / "result.json").read_text()), **proc, "adapter": str(folder / "adapter")}


def lora_exp_overrides(spec: dict, pack_tokens: int) -> list[str]:
    """The same work through the public CLI: one epoch, evaluation and loggers off."""
    return [
        "data=jsonl",
        f"data.train_path={spec['train_path']}",
        f"data.val_path={spec['eval_path']}",  # every training example is trained on; evaluation is off
        f"data.max_seq_len={spec['max_seq_len']}",
        f"data.batch_size={spec['batch_size']}",
        "data.packing=true",
        f"data.pack_tokens={pack_tokens}",
        f"seed={spec['seed']}",
        f"lora.r={spec['lora_r']}",
        f"lora.alpha={spec['lora_alpha']}",
        f"lora.dropout={spec['lora_dropout']}",
        "lora.target_modules=qkvo",
        f"optim.lr={spec['lr']}",
        f"optim.warmup_ratio={spec['warmup_ratio']}",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",  # every step's loss, as the HF contenders log it
        "logger=none",
    ] + ([f"model.path={spec['model_folder']}"] if spec.get("model_path_override") else [])


def run_lora_exp(name: str, spec: dict, extra: list[str], pack_tokens: int, work: Path) -> dict:
    folder = work / name.replace(" ", "_")
    run_dir = folder / "run"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lora_exp.train", *lora_exp_overrides(spec, pack_tokens), *extra]
    cmd.append(f"hydra.run.dir={run_dir}")
    (folder / "command.txt").write_text(" ".join(cmd[1:]) + "\n")
    proc = run_process(cmd, folder / "log.txt", folder)
    m = json.loads((run_dir / "metrics.json").read_text())
    history = _train_losses(run_dir)
    tail = history[-max(1, len(history) // 4) :] if history else [m.get("train/loss", float("nan"))]
    return {
        "tokens": m["train/tokens"],
        "steps": m["trainer/global_step"],
        "loop_s": m.get("time/train_loop_s") or m["train/time_s"],
        "first_step_s": m.get("time/first_step_s"),
        "train_loss": sum(tail) / len(tail),
        **proc,
        "adapter": str(run_dir / "adapter"),
    }


def _train_losses(run_dir: Path) -> list[float]:
    """Per-step training losses from the run directory's metric history, when it has one."""
    path = run_dir / "history.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out.append(float(row["train/loss"]))
    return out


# ---- one case (variable or fixed lengths) -------------------------------------------------------------
def run_case(case: str, spec: dict, names: list[str], work: Path, reuse: bool = False) -> dict[str, dict]:
    """Every contender on one training file, back to back; then the held-out loss of each adapter."""
    import math

    lengths = spec["lengths"]
    steps_padded = math.ceil(len(lengths) / spec["batch_size"])
    # packed batches hold as many tokens as the padded contenders' average batch, so the step
    # count (and with it the optimisation) stays comparable; a batch never cuts an example
    pack_tokens = max(max(lengths), math.ceil(sum(lengths) / steps_padded))
    results: dict[str, dict] = {}
    for name in names:
        print(f"[speed] {case}: {name} ...", flush=True)
        if name.startswith("lora_exp"):
            results[name] = run_lora_exp(name, spec, LEVERS[name], pack_tokens, work / case)
        else:
            results[name] = run_worker(name, spec, work / case, reuse)
        r = results[name]
        print(
            f"[speed] {case}: {name}: {r['tokens'] / r['loop_s']:.0f} tokens/s, {r['wall_s']:.0f} s, "
            f"{r['peak_rss_mb']:.0f} MB, {r['steps']} steps",
            flush=True,
        )
    adapters = {n: r["adapter"] for n, r in results.items()}
    eval_spec = {**spec, "adapters": adapters}
    print(f"[speed] {case}: held-out loss of {len(adapters)} adapters ...", flush=True)
    losses = run_worker("eval", eval_spec, work / case)
    for name, r in results.items():
        r["eval_loss"] = losses[name]
        r["base_eval_loss"] = losses["base"]
        r["tokens_per_s"] = r["tokens"] / r["loop_s"]
    return results


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


def table(case: str, results: dict[str, dict]) -> str:
    base = results.get(BASELINE)
    head = (
        "| contender | real tokens/s | vs HF bf16 | wall s | peak RSS MB | vs HF bf16 | steps | held-out loss |"
        " train loss (last 25%) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [f"**{case}**", "", head]
    for name, r in results.items():
        speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mem = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x" if base else "-"
        lines.append(
            f"| {name} | {r['tokens_per_s']:.0f} | {speed} | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} | {mem} "
            f"| {r['steps']} | {r['eval_loss']:.4f} | {r['train_loss']:.4f} |"
        )
    any_r = next(iter(results.values()))
    lines += [
        "",
        f"{any_r['tokens']:,} real tokens; held-out loss of the untrained base {any_r['base_eval_loss']:.4f}.",
    ]
    return "\n".join(lines)


def verdict(results: dict[str, dict]) -> list[str]:
    """The issue's targets, checked on the variable-length case."""
    if BASELINE not in results or "lora_exp" not in results:
        return []
    b, x = results[BASELINE], results["lora_exp"]
    speed = x["tokens_per_s"] / b["tokens_per_s"]
    mem = x["peak_rss_mb"] / b["peak_rss_mb"]
    dloss = abs(x["eval_loss"] - b["eval_loss"]) / b["eval_loss"]
    mark = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    out = [
        f"- real-token throughput {speed:.2f}x HF Trainer bf16 (target >= 2.5x): {mark(speed >= 2.5)}",
        f"- peak memory {mem:.2f}x (target <= 1.0x): {mark(mem <= 1.0)}",
        f"- held-out loss {x['eval_loss']:.4f} vs {b['eval_loss']:.4f} ({100 * dloss:.1f}% apart, "
        f"tolerance {100 * LOSS_TOLERANCE:.0f}%): {mark(dloss <= LOSS_TOLERANCE)}",
    ]
    full = x["tokens_per_s"]
    for name in LEVERS:
        if name != "lora_exp" and name in results:
            out.append(
                f"- lever {name.split(' ', 1)[1][1:]}: turning it off costs {full / results[name]['tokens_per_s']:.2f}x"
            )
    return out


def write_readme(text: str) -> None:
    """Replace this benchmark's section of benchmarks/README.md (other sections are left alone)."""
    path = HERE / "README.md"
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    block = f"{README_BEGIN}\n{text.strip()}\n{README_END}"
    if README_BEGIN in old and README_END in old:
        before, rest = old.split(README_BEGIN, 1)
        new = before + block + rest.split(README_END, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def cpu_main(args: argparse.Namespace) -> int:
    from lora_exp.model.load import ensure_smollm2_folder, load_tokenizer

    folder = args.model_path or str(ensure_smollm2_folder())
    tokenizer = load_tokenizer(folder)
    work = args.out or ROOT / "outputs" / "speed" / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    eval_path = speed_data.write_jsonl(work / "eval.jsonl", speed_data.generate(tokenizer, args.eval_examples, seed=1))
    cases = {"variable": speed_data.generate(tokenizer, args.examples, seed=0)}
    if not args.no_fixed:
        cases["fixed"] = speed_data.generate(tokenizer, args.fixed_examples, seed=2, fixed_length=args.fixed_length)
    common = {
        "model_folder": folder,
        "model_path_override": bool(args.model_path),
        "eval_path": str(eval_path),
        "seed": 0,
        "lora_r": 16,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "batch_size": args.batch_size,
        "lr": 1e-3,
        "warmup_ratio": 0.1,
        "max_seq_len": speed_data.MAX_LEN + 16,
    }
    started = time.perf_counter()
    args.load_before = os.getloadavg()[1]
    sections, all_results = [], {}
    for case, examples in cases.items():
        train_path = speed_data.write_jsonl(work / case / "train.jsonl", examples)
        lengths = [speed_data.rendered_length(tokenizer, e) for e in examples]
        spec = {**common, "train_path": str(train_path), "lengths": lengths}
        names = ["hf_fp32", "hf_bf16", "plain", "lora_exp"]
        if case == "variable" and not args.no_levers:
            names += [n for n in LEVERS if n != "lora_exp"]
        if case == "fixed":
            names = ["hf_bf16", "plain", "lora_exp"]
        if args.only:
            names = [n for n in names if n in args.only]
        results = run_case(case, spec, names, work, args.reuse)
        all_results[case] = results
        title = (
            f"variable lengths: {len(lengths)} examples, {min(lengths)}-{max(lengths)} tokens (median "
            f"{sorted(lengths)[len(lengths) // 2]}), batch {args.batch_size}"
            if case == "variable"
            else f"fixed length: {len(lengths)} examples of {lengths[0]} tokens (no padding: overhead alone)"
        )
        sections.append(table(title, results))
    text = report(args, sections, all_results.get("variable", {}), time.perf_counter() - started)
    print("\n" + text)
    (work / "results.json").write_text(json.dumps(all_results, indent=2))
    (work / "report.md").write_text(text + "\n")
    if args.write_readme:
        write_readme(text)
        print(f"[speed] table written to {HERE / 'README.md'}")
    print(f"[speed] results in {work}")
    return 0


def report(args, sections: list[str], variable: dict, seconds: float) -> str:
    import torch
    import transformers

    lines = [
        "## Speed: lora-exp vs HF Trainer + PEFT",
        "",
        f"Machine: {machine()}; {load_note(args.load_before)}. torch {torch.__version__}, "
        f"transformers {transformers.__version__}.",
        f"`{' '.join(['python benchmarks/speed.py', *args.argv])}` took {seconds / 60:.1f} min "
        f"({time.strftime('%Y-%m-%d')}). "
        "Model SmolLM2-135M, LoRA r=16 alpha=16 on q,k,v,o, AdamW lr 1e-3, cosine, one epoch. "
        "Real tokens/s = non-padding tokens / training-loop time; wall = whole process; "
        "peak RSS of each contender's own process; held-out loss: every adapter through the same fp32 evaluator.",
        "",
    ]
    for s in sections:
        lines += [s, ""]
    targets = verdict(variable)
    if targets:
        lines += ["Targets (variable lengths, lora-exp vs HF Trainer bf16):", "", *targets, ""]
    lines.append("Contenders: " + "; ".join(f"`{k}` {v}" for k, v in DESCRIPTIONS.items()) + ".")
    lines += ["", NOTES.strip()]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.gpu:
        import speed_gpu

        return speed_gpu.main(args)
    return cpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
