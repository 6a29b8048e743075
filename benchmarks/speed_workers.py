"""The benchmark's contenders, each run as its own process: ``python benchmarks/speed_workers.py NAME SPEC OUT``.

``hf``: HF Trainer + PEFT the usual way (dynamic padding with ``DataCollatorForSeq2Seq``), fp32 or
``bf16=True``. ``plain``: a minimal PyTorch loop over the same padded batches (bf16 autocast where
the CPU has native bf16, fp32 elsewhere: ``spec["bf16"]``), the floor for per-step overhead.
``eval``: held-out loss of every trained adapter, computed by one piece of code so the contenders'
results are compared on equal terms. lora-exp itself runs through
its public CLI (see ``speed.py``).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import psutil

PROCESS_START = psutil.Process().create_time()  # wall-clock start of this process (imports included)


def tokenize_usual(tokenizer, examples: list[dict]) -> list[dict]:
    """What most HF scripts do: render with the chat template, mask the prompt's tokens in the labels."""
    rows = []
    for e in examples:
        msgs = e["messages"]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * n_prompt + ids[n_prompt:]})
    return rows


def lora_config(spec: dict):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM",
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=spec["lora_dropout"],
        target_modules=spec["target_modules"],
    )


def load(spec: dict):
    """Tokenizer, tokenized rows and the fp32 base wrapped with LoRA (seeded before wrapping)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from speed_data import read_jsonl

    from lora_exp.model.load import load_tokenizer

    tokenizer = load_tokenizer(spec["model_folder"])
    rows = tokenize_usual(tokenizer, read_jsonl(spec["train_path"]))
    model = AutoModelForCausalLM.from_pretrained(spec["model_folder"], dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(spec["seed"])
    model = get_peft_model(model, lora_config(spec))
    return tokenizer, rows, model


def tail_mean(losses: list[float]) -> float:
    """Mean training loss over the last quarter of the epoch."""
    tail = losses[-max(1, len(losses) // 4) :]
    return sum(tail) / len(tail)


def run_hf(spec: dict, bf16: bool) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    tokenizer, rows, model = load(spec)
    from datasets import Dataset

    dataset = Dataset.from_list(rows)
    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.setdefault("loop_start", time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            clock["loop_end"] = time.perf_counter()
            clock.setdefault("first_step_end", time.time())

    out_dir = Path(spec["out_dir"])
    args = TrainingArguments(
        output_dir=str(out_dir / "hf"),
        per_device_train_batch_size=spec["batch_size"],
        num_train_epochs=1,
        learning_rate=spec["lr"],
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(spec["warmup_ratio"] * math.ceil(len(rows) / spec["batch_size"])),
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=bf16,
        use_cpu=not spec.get("gpu", False),
        seed=spec["seed"],
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
        callbacks=[Clock()],
    )
    trainer.train()
    model.save_pretrained(out_dir / "adapter")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return _result(rows, spec["batch_size"], clock, trainer.state.global_step, tail_mean(losses))


def run_plain(spec: dict) -> dict:
    """The floor: a bare loop over the same padded batches, AdamW, cosine, clipping; bf16 autocast
    only where the CPU multiplies bf16 natively (``spec["bf16"]``), fp32 elsewhere."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq, get_cosine_schedule_with_warmup

    tokenizer, rows, model = load(spec)
    model.train()
    loader = DataLoader(
        rows,
        batch_size=spec["batch_size"],
        shuffle=True,
        generator=torch.Generator().manual_seed(spec["seed"]),
        collate_fn=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt"),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    steps = len(loader)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(spec["warmup_ratio"] * steps), steps)
    clock: dict[str, float] = {}
    losses = []
    clock["loop_start"] = time.perf_counter()
    for batch in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(spec.get("bf16", True))):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        clock.setdefault("first_step_end", time.time())
    clock["loop_end"] = time.perf_counter()
    model.save_pretrained(Path(spec["out_dir"]) / "adapter")
    return _result(rows, spec["batch_size"], clock, steps, tail_mean(losses))


def _result(rows: list[dict], batch_size: int, clock: dict, steps: int, train_loss: float) -> dict:
    lengths = [len(r["input_ids"]) for r in rows]
    return {
        "tokens": sum(lengths),
        "steps": steps,
        "loop_s": clock["loop_end"] - clock["loop_start"],
        "first_step_s": clock["first_step_end"] - PROCESS_START,
        "train_loss": train_loss,
    }


def run_eval(spec: dict) -> dict:
    """Held-out loss (mean over supervised tokens, fp32) of the base model and of every adapter."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    sys.path.insert(0, str(Path(__file__).parent))
    from speed_data import read_jsonl

    from lora_exp.model.load import load_tokenizer

    tokenizer = load_tokenizer(spec["model_folder"])
    rows = tokenize_usual(tokenizer, read_jsonl(spec["eval_path"]))
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    batches = [collate(rows[i : i + 8]) for i in range(0, len(rows), 8)]
    base = AutoModelForCausalLM.from_pretrained(spec["model_folder"], dtype=torch.float32, attn_implementation="sdpa")

    @torch.no_grad()
    def loss_of(model) -> float:
        model.eval()
        total, count = 0.0, 0
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            targets = b["labels"][:, 1:]
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum"
            )
            total += ce.item()
            count += int((targets != -100).sum())
        return total / count

    result = {"base": loss_of(base)}
    for name, adapter in spec["adapters"].items():
        model = PeftModel.from_pretrained(base, adapter)
        result[name] = loss_of(model)
        base = model.unload()  # the same base for the next adapter
    return result


def main() -> None:
    name, spec_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    if name in ("hf_fp32", "hf_bf16"):
        result = run_hf(spec, bf16=name == "hf_bf16")
    elif name == "plain":
        result = run_plain(spec)
    elif name == "eval":
        result = run_eval(spec)
    else:
        raise SystemExit(f"unknown contender {name!r}")
    Path(out_path).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
