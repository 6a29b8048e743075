"""Speed benchmark: lora-exp against HF Trainer + PEFT and a plain PyTorch loop, on the same work.

    python benchmarks/speed.py              # CPU: this machine's table in benchmarks/README.md (~25 min, idle 2 cores)
    python benchmarks/speed.py --quick      # a small smoke run of every contender (~5 min)
    python benchmarks/speed.py --gpu        # Llama-3.1-8B architecture, bf16 LoRA, seq 2048: tokens/s and MFU

Every contender is its own process (peak RSS is per process, read from ``os.wait4``), trains the
same model (SmolLM2-135M by default) with the same LoRA (r=16, alpha=16, dropout 0.05, q,k,v,o),
the same optimizer and schedule, for one epoch over the same JSONL file written here. Afterwards
one evaluator computes every trained adapter's held-out loss with the same code, so "same final
loss" is checked on equal terms.

Each contender runs at its best precision for this machine: bf16 only where the CPU multiplies
bf16 natively (``lora_exp.model.precision.detect``; AVX512-BF16 / AMX), float32 elsewhere, where
bf16 is ~50x slower. Ratios are against the anchor, HF Trainer + PEFT at that precision. The
``lora_exp`` row is ``python -m lora_exp.train`` with the benchmark's data, model and LoRA and
nothing else: the defaults as a user gets them. ``LORA_EXP_CPU_BF16=0|1`` fakes the detection.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import speed_data  # noqa: E402
from speed_report import anchor_name, capability_label, report, table, write_readme  # noqa: E402

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
BF16 = ["model.dtype=bfloat16", "trainer.precision=bf16-mixed"]
FP32 = ["model.dtype=float32", "trainer.precision=32-true"]
SLOW_BF16 = "skipped: slow here (no native bf16, ~50x slower than fp32; --include-slow runs it)"


def lora_exp_rows(device) -> dict[str, list[str]]:
    """lora-exp's rows: the defaults, the fastest setting, one lever off at a time, the other precision.

    ``{pack_tokens}`` is filled in per case (the padded contenders' average batch in tokens).
    """
    rows = {
        "lora_exp": [],
        "lora_exp fastest": ["data.packing=true", "data.pack_tokens={pack_tokens}"],
        "lora_exp -padding-free": ["data.padding_free=false"],
        "lora_exp -packed attention": ["speed.packed_attention=false"],
        "lora_exp -bits dropout": ["speed.lora_dropout=false"],
        "lora_exp -lean loss": ["loss.impl=full"],
    }
    if device.bf16:
        rows["lora_exp -no input cast"] = ["speed.no_input_cast=false"]  # acts under bf16 autocast only
        rows["lora_exp fp32"] = FP32
    else:
        rows["lora_exp bf16"] = BF16
    return rows


def slow_here(name: str, device) -> bool:
    """A contender that forces bf16 on a CPU without native bf16 (~50x slower than its fp32 run)."""
    return not device.bf16 and name in ("hf_bf16", "lora_exp bf16")


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
    p.add_argument("--include-slow", action="store_true", help="also run bf16 contenders on a CPU without native bf16")
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


def lora_exp_overrides(spec: dict) -> list[str]:
    """The benchmark's work through the public CLI: its data, model and LoRA, one epoch, no evaluation
    and no logger; nothing about precision, speed or batching (the defaults decide those)."""
    return [
        "data=jsonl",
        f"data.train_path={spec['train_path']}",
        f"data.val_path={spec['eval_path']}",  # every training example is trained on; evaluation is off
        f"data.max_seq_len={spec['max_seq_len']}",
        f"data.batch_size={spec['batch_size']}",
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


def run_lora_exp(name: str, spec: dict, extra: list[str], work: Path) -> dict:
    folder = work / name.replace(" ", "_")
    run_dir = folder / "run"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lora_exp.train", *lora_exp_overrides(spec), *extra]
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
        "precision": m.get("precision/trainer"),
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
def run_case(case: str, spec: dict, names: list[str], work: Path, device, args) -> dict[str, dict]:
    """Every contender on one training file, back to back; then the held-out loss of each adapter."""
    import math

    lengths = spec["lengths"]
    steps_padded = math.ceil(len(lengths) / spec["batch_size"])
    # packed batches hold as many tokens as the padded contenders' average batch, so the step
    # count (and with it the optimisation) stays comparable; a batch never cuts an example
    pack_tokens = max(max(lengths), math.ceil(sum(lengths) / steps_padded))
    rows = lora_exp_rows(device)
    results: dict[str, dict] = {}
    for name in names:
        if slow_here(name, device) and not args.include_slow:
            results[name] = {"skipped": SLOW_BF16}
            print(f"[speed] {case}: {name}: {SLOW_BF16}", flush=True)
            continue
        print(f"[speed] {case}: {name} ...", flush=True)
        if name.startswith("lora_exp"):
            extra = [o.format(pack_tokens=pack_tokens) for o in rows[name]]
            results[name] = run_lora_exp(name, spec, extra, work / case)
        else:
            results[name] = run_worker(name, spec, work / case, args.reuse)
        r = results[name]
        print(
            f"[speed] {case}: {name}: {r['tokens'] / r['loop_s']:.0f} tokens/s, {r['wall_s']:.0f} s, "
            f"{r['peak_rss_mb']:.0f} MB, {r['steps']} steps",
            flush=True,
        )
    ran = {n: r for n, r in results.items() if "skipped" not in r}
    adapters = {n: r["adapter"] for n, r in ran.items()}
    eval_spec = {**spec, "adapters": adapters}
    print(f"[speed] {case}: held-out loss of {len(adapters)} adapters ...", flush=True)
    losses = run_worker("eval", eval_spec, work / case)
    for name, r in ran.items():
        r["eval_loss"] = losses[name]
        r["base_eval_loss"] = losses["base"]
        r["tokens_per_s"] = r["tokens"] / r["loop_s"]
    return results


def cpu_main(args: argparse.Namespace) -> int:
    from lora_exp.model.load import ensure_smollm2_folder, load_tokenizer
    from lora_exp.model.precision import detect

    device = detect("cpu")
    anchor, label = anchor_name(device), capability_label(device)
    print(f"[speed] CPU capability {label} ({device.describe()}): anchor {anchor}", flush=True)

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
        "bf16": device.bf16,  # the plain loop's autocast: bf16 only where native
    }
    started = time.perf_counter()
    args.load_before = os.getloadavg()[1]
    sections, all_results = [], {}
    for case, examples in cases.items():
        train_path = speed_data.write_jsonl(work / case / "train.jsonl", examples)
        lengths = [speed_data.rendered_length(tokenizer, e) for e in examples]
        spec = {**common, "train_path": str(train_path), "lengths": lengths}
        other_hf = "hf_fp32" if anchor == "hf_bf16" else "hf_bf16"
        names = [anchor, other_hf, "plain", "lora_exp", "lora_exp fastest"]
        if case == "variable" and not args.no_levers:
            names += [n for n in lora_exp_rows(device) if n not in names]
        if case == "fixed":
            names = [anchor, "plain", "lora_exp"]
        if args.only:
            names = [n for n in names if n in args.only]
        results = run_case(case, spec, names, work, device, args)
        all_results[case] = results
        title = (
            f"variable lengths: {len(lengths)} examples, {min(lengths)}-{max(lengths)} tokens (median "
            f"{sorted(lengths)[len(lengths) // 2]}), batch {args.batch_size}"
            if case == "variable"
            else f"fixed length: {len(lengths)} examples of {lengths[0]} tokens (no padding: overhead alone)"
        )
        sections.append(table(title, results, anchor))
    all_results["device"] = {"label": label, "capability": device.capability, "bf16": device.bf16}
    text = report(args, sections, all_results.get("variable", {}), time.perf_counter() - started, device)
    print("\n" + text)
    (work / "results.json").write_text(json.dumps(all_results, indent=2))
    (work / "report.md").write_text(text + "\n")
    if args.write_readme:
        write_readme(text, label)
        print(f"[speed] table written to {HERE / 'README.md'}")
    print(f"[speed] results in {work}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.gpu:
        import speed_gpu

        return speed_gpu.main(args)
    return cpu_main(args)


if __name__ == "__main__":
    sys.exit(main())
